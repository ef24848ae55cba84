"""Views through the controller: direct, load-balanced and broadcast; data movement; hub queries.

All functions shipped to engines are ``@interactive`` (their globals are the engine's user
namespace), so they import what they use.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import pytest
from ipyparallel import RemoteError, interactive

from cluster import wait_for_gate, wait_until

ENGINES = 4

pytestmark = pytest.mark.timeout(90)


@interactive
def getpid():
    import os

    return os.getpid()


@interactive
def add(a, b=10):
    return a + b


@interactive
def square(x):
    return x * x


@interactive
def length_of(name):
    return len(globals()[name])  # globals() is the engine's user namespace


@interactive
def double_array(arr):
    return arr * 2


@interactive
def pid_after(delay):
    import os
    import time

    time.sleep(delay)
    return os.getpid()


@interactive
def chatty(tag):
    import sys

    print("hello", tag)
    print("warn", tag, file=sys.stderr)
    return tag


def test_all_engines_registered(rc, cluster):
    assert sorted(rc.ids) == list(range(ENGINES))
    assert rc[:].apply_async(getpid).get_dict(timeout=30) == cluster.engine_pids


def test_apply_sync_single_and_all(rc, cluster):
    assert rc[0].apply_sync(add, 2, 3) == 5
    assert rc[1].apply_sync(add, 2) == 12
    assert rc[1].apply_sync(add, a=1, b=1) == 2
    dv = rc[:]
    assert dv.apply_sync(add, 1, b=2) == [3] * ENGINES
    assert dv.apply_sync(getpid) == [cluster.engine_pids[i] for i in dv.targets]


def test_apply_async(rc, cluster):
    ars = {i: rc[i].apply_async(square, i + 3) for i in rc.ids}
    for i, ar in ars.items():
        assert ar.get(timeout=30) == (i + 3) ** 2
        assert ar.ready() and ar.successful()
        assert ar.engine_id == i
    ar = rc[:].apply_async(getpid)
    assert ar.get_dict(timeout=30) == cluster.engine_pids


def test_apply_numpy_argument_and_result(rc):
    # Larger than 1 KiB, so argument and result travel as separate buffer frames.
    arr = np.arange(5000, dtype=np.float64).reshape(50, 100) / 7.0
    for i in rc.ids:
        out = rc[i].apply_sync(double_array, arr)
        assert out.dtype == arr.dtype and out.shape == arr.shape
        np.testing.assert_array_equal(out, arr * 2)


def test_execute(rc):
    dv = rc[:]
    ar = dv.execute("ex_a = 5\nex_b = ex_a * 3", block=False)
    ar.get(timeout=30)
    assert ar.successful()
    assert dv.pull("ex_b", block=True) == [15] * ENGINES
    ar = dv.execute("print('printed', ex_b)", silent=False, block=False)
    ar.get(timeout=30)
    ar.wait_for_output(timeout=10)
    assert ar.stdout == ["printed 15\n"] * ENGINES


def test_push_pull(rc):
    dv = rc[:]
    dv.push({"pp_x": 1, "pp_y": "two", "pp_z": [1, 2, {"k": None}]}, block=True)
    assert dv.pull("pp_x", block=True) == [1] * ENGINES
    assert dv.pull(("pp_y", "pp_z"), block=True) == [["two", [1, 2, {"k": None}]]] * ENGINES
    rc[2].push({"pp_x": 42}, block=True)
    assert rc[2].pull("pp_x", block=True) == 42
    assert dv.pull("pp_x", block=True) == [42 if t == 2 else 1 for t in dv.targets]


def test_push_pull_numpy_per_engine(rc):
    arrays = {i: np.random.default_rng(i).standard_normal((300, 7)) for i in rc.ids}
    for i, arr in arrays.items():
        rc[i].push({"npa": arr}, block=True)
    for i, arr in arrays.items():
        got = rc[i].pull("npa", block=True)
        np.testing.assert_array_equal(got, arr)


def test_scatter_gather_numpy(rc):
    dv = rc[:]
    arr = np.arange(1001, dtype=np.float64) * 0.5
    dv.scatter("chunk", arr, block=True)
    lengths = dv.apply_sync(length_of, "chunk")
    assert sum(lengths) == len(arr)
    assert all(n in (250, 251) for n in lengths), lengths
    gathered = dv.gather("chunk", block=True)
    np.testing.assert_array_equal(gathered, arr)

    mat = np.arange(40 * 3, dtype=np.int32).reshape(40, 3)
    dv.scatter("rows", mat, block=True)
    np.testing.assert_array_equal(dv.gather("rows", block=True), mat)


def test_getitem_setitem(rc):
    dv = rc[:]
    dv["gs_a"] = 7
    assert dv["gs_a"] == [7] * ENGINES
    rc[3]["gs_b"] = "only three"
    assert rc[3]["gs_b"] == "only three"
    with pytest.raises(RemoteError) as excinfo:
        rc[0]["gs_b"]
    assert excinfo.value.ename == "NameError"


def test_map_direct(rc):
    dv = rc[:]
    assert dv.map_sync(square, range(37)) == [x * x for x in range(37)]
    ar = dv.map(square, range(10), block=False)
    assert list(ar.get(timeout=30)) == [x * x for x in range(10)]


def test_map_load_balanced(rc):
    lview = rc.load_balanced_view()
    assert lview.map_sync(square, range(37)) == [x * x for x in range(37)]
    ar = lview.map(square, range(23), chunksize=4, block=False)
    assert list(ar.get(timeout=30)) == [x * x for x in range(23)]
    ar = lview.map(add, range(5), range(5, 10), block=False, ordered=False)
    assert sorted(ar.get(timeout=30)) == [a + b for a, b in zip(range(5), range(5, 10))]


def test_load_balanced_apply_and_spread(rc, cluster):
    lview = rc.load_balanced_view()
    ar = lview.apply_async(add, 40, 2)
    assert ar.get(timeout=30) == 42
    assert ar.engine_id in rc.ids
    # With the default of one outstanding task per engine the first tasks go to different
    # engines, so a batch of slow tasks must not all land on the same one.
    pids = lview.map_sync(pid_after, [0.3] * (2 * ENGINES))
    assert set(pids) <= set(cluster.engine_pids.values())
    assert len(set(pids)) >= 2, pids


def test_load_balanced_targets(rc, cluster):
    for i in (1, 3):
        lview = rc.load_balanced_view(targets=[i])
        pids = lview.map_sync(pid_after, [0.0] * 5)
        assert pids == [cluster.engine_pids[i]] * 5
        ar = lview.apply_async(getpid)
        assert ar.get(timeout=30) == cluster.engine_pids[i]
        assert ar.engine_id == i


@pytest.mark.parametrize("coalescing", [False, True], ids=["non-coalescing", "coalescing"])
def test_broadcast_apply(rc, cluster, coalescing):
    bview = rc.broadcast_view(is_coalescing=coalescing)
    ar = bview.apply_async(getpid)
    results = ar.get(timeout=30)
    assert len(results) == ENGINES
    # Results may come in any engine order; each must be paired with the engine that ran it.
    assert dict(zip(ar.engine_id, results)) == cluster.engine_pids
    assert sorted(ar.engine_id) == sorted(rc.ids)

    sub = rc.broadcast_view(targets=[1, 2], is_coalescing=coalescing)
    ar = sub.apply_async(add, 1, 2)
    assert ar.get(timeout=30) == [3, 3]
    assert sorted(ar.engine_id) == [1, 2]

    arr = np.linspace(0, 1, 4000)
    ar = bview.apply_async(double_array, arr)
    for out in ar.get(timeout=30):
        np.testing.assert_array_equal(out, arr * 2)


def test_broadcast_execute(rc, controller_kind):
    bview = rc.broadcast_view()
    # What execute(block=True) does, with bounds: stock's own block=True waits for the
    # output without a timeout.
    ar = bview.execute("bc_v = 9 * 9", block=False)
    ar.get(timeout=30)
    if not ar.wait_for_output(timeout=30) and controller_kind == "stock":
        # Seen once in CI under load (2 xdist workers) with stock ipcontroller 7.1, not
        # reproduced in 600 tries: one engine's idle status missing. Most likely the new
        # client's iopub subscription was not live yet; the harness now waits for it
        # (ClientsMixin.client), and this stays as a net for stock only.
        pytest.xfail("stock ipcontroller lost an engine's idle status of a broadcast execute")
    assert ar.wait_for_output(timeout=0), "no idle status from every engine within 30 s"
    assert rc[:].pull("bc_v", block=True) == [81] * ENGINES


def test_asyncresult_metadata(rc):
    ar = rc[1].apply_async(chatty, "tag-1")
    assert ar.get(timeout=30) == "tag-1"
    ar.wait_for_output(timeout=10)
    assert ar.engine_id == 1
    # stock 7.1's wait_for_output can return before a loaded client has read the stream
    wait_until(lambda: ar.stdout and ar.stderr, 10, 0.05, "the output to arrive")
    assert ar.stdout == "hello tag-1\n"
    assert ar.stderr == "warn tag-1\n"
    md = ar.metadata
    assert md["status"] == "ok"
    assert md["engine_id"] == 1
    assert md["engine_uuid"] == rc._engines[1]
    for key in ("submitted", "started", "completed", "received"):
        assert isinstance(md[key], datetime.datetime), (key, md[key])
    assert md["started"] <= md["completed"]
    assert md["submitted"] <= md["received"]

    ar = rc.load_balanced_view().apply_async(chatty, "lb")
    assert ar.get(timeout=30) == "lb"
    ar.wait_for_output(timeout=10)
    assert ar.stdout == "hello lb\n"
    assert ar.engine_id in rc.ids
    assert ar.metadata["engine_uuid"] == rc._engines[ar.engine_id]


def test_clear(rc):
    dv = rc[:]
    dv["to_clear"] = 1
    # The push is not blocking and clear goes on the control channel: make sure it landed.
    assert dv["to_clear"] == [1] * ENGINES
    rc.clear(targets=[0, 1], block=True)
    for i in (0, 1):
        with pytest.raises(RemoteError) as excinfo:
            rc[i]["to_clear"]
        assert excinfo.value.ename == "NameError"
    assert rc[2]["to_clear"] == 1 and rc[3]["to_clear"] == 1
    rc[:].clear(block=True)
    with pytest.raises(RemoteError):
        rc[3]["to_clear"]


def _settled_queue_status(rc, timeout=15):
    """queue_status once no engine has pending work (the stock hub updates asynchronously)."""

    def settled():
        qs = rc.queue_status()
        idle = all(qs[i]["queue"] == 0 and qs[i]["tasks"] == 0 for i in rc.ids)
        return qs if idle and qs["unassigned"] == 0 else None

    return wait_until(settled, timeout, 0.1, "an idle queue_status")


def test_queue_status_shape(rc):
    qs = _settled_queue_status(rc)
    assert set(rc.ids) <= set(qs) and "unassigned" in qs
    assert set(qs) - set(rc.ids) == {"unassigned"}
    for i in rc.ids:
        assert set(qs[i]) == {"queue", "completed", "tasks"}
        assert all(isinstance(v, int) for v in qs[i].values())
    one = rc.queue_status(targets=2)
    assert set(one) == {"queue", "completed", "tasks"}
    verbose = rc.queue_status(verbose=True)
    assert isinstance(verbose["unassigned"], list)
    for i in rc.ids:
        assert all(isinstance(v, list) for v in verbose[i].values())


def test_queue_status_tracks_tasks(rc, tmp_path):
    before = _settled_queue_status(rc)
    gate = str(tmp_path / "gate")
    ar = rc[2].apply_async(wait_for_gate, gate, 60)
    try:
        wait_until(lambda: os.path.exists(gate + ".started"), 30, what="the task to start")
        wait_until(lambda: rc.queue_status()[2]["queue"] == 1, 15, 0.1,
                   "engine 2 to show one queued task")
        during = rc.queue_status(verbose=True)
        assert during[2]["queue"] == ar.msg_ids
    finally:
        open(gate, "w").close()
    assert ar.get(timeout=30) == "released"

    lar = rc.load_balanced_view(targets=[3]).apply_async(add, 1, 1)
    assert lar.get(timeout=30) == 2
    after = _settled_queue_status(rc)
    assert after[2]["completed"] >= before[2]["completed"] + 1
    assert after[3]["completed"] >= before[3]["completed"] + 1
    verbose = rc.queue_status(verbose=True)
    assert ar.msg_ids[0] in verbose[2]["completed"]
    assert lar.msg_ids[0] in verbose[3]["completed"]


def test_top_level_await_in_execute(rc):
    # IPython's autoawait, as in the stock engine: a cell may await at top level.
    dv = rc[:]
    cell = "import asyncio\nasync def f():\n    await asyncio.sleep(0.01)\n    return 7\nv = await f()"
    assert dv.execute(cell, block=True).successful()
    assert dv.pull("v", block=True) == [7] * len(rc.ids)
