"""Load-balancing schemes and the high-water mark, chosen on the controller's command line
(``--scheme``/``--TaskScheduler.scheme_name``, ``--hwm``/``--TaskScheduler.hwm``), as the stock
ipcontroller reads them (protocol §7.1-7.3)."""

from __future__ import annotations

import os

import pytest
from ipyparallel import interactive

from cluster import wait_until

pytestmark = pytest.mark.timeout(150)


@interactive
def triple(x):
    return x * 3


@interactive
def pid_after(delay):
    import os
    import time

    time.sleep(delay)
    return os.getpid()


@interactive
def gated(path, limit=60):
    """Records this engine's pid in ``path + '.<pid>'``, then waits for ``path`` to exist."""
    import os
    import time

    open(f"{path}.{os.getpid()}", "w").close()
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return "gate timeout"
        time.sleep(0.02)
    return os.getpid()


def assigned(rc):
    qs = rc.queue_status()
    return sum(qs[i]["tasks"] for i in rc.ids), qs["unassigned"]


def hold_tasks(rc, n, tmp_path, name="gate"):
    gate = str(tmp_path / name)
    lview = rc.load_balanced_view()
    ars = [lview.apply_async(gated, gate) for _ in range(n)]
    return gate, ars


# (scheme, the option spelling used for it)
SCHEMES = [
    ("lru", "--scheme=lru"),
    ("plainrandom", "--TaskScheduler.scheme_name=plainrandom"),
    ("twobin", "--scheme=twobin"),
    ("weighted", "--TaskScheduler.scheme_name=weighted"),
    ("leastload", "--scheme=leastload"),
]


@pytest.mark.parametrize("scheme, option", SCHEMES, ids=[s for s, _ in SCHEMES])
def test_scheme(make_cluster, tmp_path, scheme, option):
    c = make_cluster(2, args=[option])
    assert c.client_info()["task_scheme"] == scheme
    rc = c.client()
    lview = rc.load_balanced_view()
    assert lview.map_sync(triple, range(20)) == [x * 3 for x in range(20)]
    # Every scheme honours the HWM (1): two blocked tasks hold both engines, a third waits.
    gate, ars = hold_tasks(rc, 3, tmp_path)
    wait_until(lambda: assigned(rc) == (2, 1), 20, 0.1, "two tasks running and one waiting")
    wait_until(lambda: len([p for p in os.listdir(tmp_path) if p.startswith("gate.")]) == 2, 20, 0.1,
               "both engines to start a task")
    # the hub's view may lag the engines by a notification under load (stock)
    wait_until(lambda: assigned(rc) == (2, 1), 10, 0.1, "the hub to count two running, one waiting")
    open(gate, "w").close()
    pids = [ar.get(timeout=30) for ar in ars]
    assert set(pids) == set(c.engine_pids.values())
    # dependencies work under every scheme
    first = lview.apply_async(pid_after, 0.1)
    with lview.temp_flags(follow=first):
        assert lview.apply_async(pid_after, 0).get(timeout=30) == first.get(timeout=30)


@pytest.mark.parametrize("scheme", ["leastload", "lru"])
def test_idle_engines_take_turns(make_cluster, scheme):
    # All loads equal: leastload breaks ties by least recently used, lru always takes it.
    c = make_cluster(2, args=[f"--scheme={scheme}"])
    rc = c.client()
    lview = rc.load_balanced_view()
    order = [lview.apply_async(pid_after, 0).get(timeout=30) for _ in range(6)]
    assert order[0] != order[1]
    assert order == [order[0], order[1]] * 3


@pytest.mark.parametrize("option, running", [
    (None, 2),                          # stock default: 1 per engine
    ("--hwm=0", 6),                     # unlimited
    ("--TaskScheduler.hwm=2", 4),
], ids=["default", "hwm0", "hwm2"])
def test_high_water_mark(make_cluster, tmp_path, option, running):
    c = make_cluster(2, args=[option] if option else [])
    rc = c.client()
    gate, ars = hold_tasks(rc, 6, tmp_path)
    try:
        wait_until(lambda: assigned(rc) == (running, 6 - running), 20, 0.1,
                   f"{running} tasks assigned and {6 - running} waiting")
        qs = rc.queue_status()
        assert [qs[i]["tasks"] for i in sorted(rc.ids)] == [running // 2] * 2
    finally:
        open(gate, "w").close()
    assert sorted(set(ar.get(timeout=30) for ar in ars)) == sorted(c.engine_pids.values())


def test_unknown_scheme_is_refused(controller_kind, tmp_path, request):
    import subprocess

    import cluster as harness

    if controller_kind == "stock":
        # Its scheduler process dies on the bad Enum value; the controller keeps running
        # without load balancing.
        request.applymarker(pytest.mark.xfail(strict=True, reason="stock ipcontroller starts anyway"))
    argv = harness.controller_command(controller_kind) + harness.controller_args(tmp_path / "profile")
    log = tmp_path / "controller.log"
    tracker = harness.ProcessTracker()
    with open(log, "wb") as out:
        popen = subprocess.Popen(argv + ["--scheme=nonsense"], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                                 env=dict(os.environ, IPYTHONDIR=str(tmp_path / "ipython")))
    tracker.add_popen(popen, "controller")
    try:
        try:
            code = popen.wait(timeout=5)  # pxcontroller refuses at once; stock keeps running
        except subprocess.TimeoutExpired:
            code = None
    finally:
        tracker.stop()
    assert code not in (None, 0)
    assert b"nonsense" in log.read_bytes()
