"""pyengines (``EngineRuntime`` behind a Python wire layer) driven by the stock client.

Everything here goes through a stock controller and the stock ``ipyparallel.Client`` exactly as
a user would; functions are marked ``@ipp.interactive`` so they run in the engine namespace.
"""

from __future__ import annotations

import re
import signal
import subprocess
import textwrap
import time

import numpy as np
import pytest

import ipyparallel as ipp
from ipyparallel import error

from harness import PYTHON, wait_until


@ipp.interactive
def double(x):
    return 2 * x


@ipp.interactive
def chatty(x):
    print("hello", x)
    import sys

    print("oops", x, file=sys.stderr)
    return x


@ipp.interactive
def divide_by_zero():
    return 1 / 0


@ipp.interactive
def engine_id_and_shell():
    return get_ipython().__class__.__name__, get_ipython().kernel.engine_id  # noqa: F821


def test_apply_sync(dv, cluster):
    assert dv.apply_sync(double, 21) == [42, 42]
    ar = dv.apply_async(double, 1)
    ar.get(timeout=10)
    assert sorted(ar.engine_id) == sorted(cluster.py_ids)
    assert sorted(ar.engine_uuid) == sorted(cluster.py_uuids)
    assert all(md["status"] == "ok" for md in ar._metadata)


def test_get_ipython_is_zmq_shell(dv, cluster):
    assert dv.apply_sync(engine_id_and_shell) == [
        ("ZMQInteractiveShell", eid) for eid in cluster.py_ids
    ]


def test_stdout_and_stderr_in_metadata(dv):
    ar = dv.apply_async(chatty, 7)
    assert ar.get(timeout=10) == [7, 7]
    ar.wait_for_output(timeout=10)
    assert ar.stdout == ["hello 7\n", "hello 7\n"]
    assert ar.stderr == ["oops 7\n", "oops 7\n"]


def test_output_is_streamed_while_running(cluster):
    view = cluster.client[cluster.py_ids[0]]
    ar = view.execute("import time\nprint('early')\ntime.sleep(3)\nprint('late')", block=False)
    wait_until(lambda: "early" in (ar["stdout"] or ""), 10, "output of a running cell")
    assert not ar.ready()
    ar.get(timeout=20)
    ar.wait_for_output(timeout=10)
    assert ar["stdout"] == "early\nlate\n"


def test_execute_push_pull_and_item_access(dv):
    dv.execute("a = 10 * 2")
    assert dv.pull("a") == [20, 20]
    dv.push({"x": 1, "y": [1, 2, "three"]})
    assert dv.pull(("x", "y")) == [[1, [1, 2, "three"]]] * 2
    dv["z"] = {"k": (1, 2)}
    assert dv["z"] == [{"k": (1, 2)}] * 2


def test_scatter_gather_numpy(dv, cluster):
    arr = np.arange(4096, dtype=np.float64)
    dv.scatter("chunk", arr)
    dv.execute("doubled = chunk * 2")
    np.testing.assert_array_equal(dv.gather("doubled"), arr * 2)
    # big arrays travel as raw frames both ways; unpacked arrays are writable views, as stock
    probe = ipp.interactive(lambda a: (a.sum(), a.flags.writeable))
    sums = dv.apply_sync(probe, arr)
    assert sums == [(arr.sum(), True)] * 2
    assert cluster.client[cluster.stock_id].apply_sync(probe, arr) == sums[0]
    back = dv.apply_sync(ipp.interactive(lambda n: __import__("numpy").ones((n, 3), dtype="i4")), 1000)
    assert all(b.shape == (1000, 3) and b.dtype == np.int32 and b.sum() == 3000 for b in back)


def test_map_direct_and_load_balanced(cluster):
    rc = cluster.client
    dv = rc[cluster.py_ids]
    assert dv.map_sync(ipp.interactive(lambda x: x ** 2), range(10)) == [x ** 2 for x in range(10)]
    lview = rc.load_balanced_view(cluster.py_ids)
    ar = lview.map_async(ipp.interactive(lambda x: x + 1), range(20))
    assert ar.get(timeout=30) == list(range(1, 21))
    assert set(ar.engine_id) <= set(cluster.py_ids)


@pytest.mark.parametrize("coalescing", [False, True])
def test_broadcast_view(cluster, coalescing):
    rc = cluster.client
    bview = rc.broadcast_view(cluster.py_ids, is_coalescing=coalescing)
    ar = bview.apply_async(double, 5)
    assert ar.get(timeout=10) == [10, 10]
    bview.execute("bcast = 3", block=True)
    assert rc[cluster.py_ids].pull("bcast", block=True) == [3, 3]


def test_remote_error_single_engine(cluster):
    view = cluster.client[cluster.py_ids[0]]
    with pytest.raises(error.RemoteError) as info:
        view.apply_sync(divide_by_zero)
    e = info.value
    assert e.ename == "ZeroDivisionError"
    assert e.engine_info["engine_id"] == cluster.py_ids[0]
    assert e.engine_info["method"] == "apply"
    assert "ZeroDivisionError" in e.traceback


def test_composite_error_names_engines(dv, cluster):
    with pytest.raises(error.CompositeError) as info:
        dv.apply_sync(divide_by_zero)
    assert _engine_sections(info.value) == {
        (eid, "apply", "ZeroDivisionError") for eid in cluster.py_ids
    }
    with pytest.raises(error.CompositeError) as info:
        dv.execute("undefined_name_xyz")
    assert _engine_sections(info.value) == {
        (eid, "execute", "NameError") for eid in cluster.py_ids
    }


def _engine_sections(composite):
    """{(engine id, method, ename)} as CompositeError renders them."""
    rendered = "\n".join(composite.render_traceback())
    heads = re.findall(r"^\[(\d+):(\w+)\]: ", rendered, flags=re.M)
    enames = {(info["engine_id"], ename) for ename, _, _, info in composite.elist}
    for eid, ename in enames:
        assert re.search(rf"^\[{eid}:\w+\]: (?:.|\n)*?{ename}", rendered, flags=re.M)
    names = dict(enames)
    return {(int(eid), method, names[int(eid)]) for eid, method in heads}


def test_error_metadata_from_iopub(dv, cluster):
    ar = dv.apply_async(divide_by_zero)
    with pytest.raises(error.CompositeError):
        ar.get(timeout=10)
    ar.wait_for_output(timeout=10)
    for md, eid in zip(ar._metadata, ar.engine_id):
        assert md["error"].ename == "ZeroDivisionError"
        assert md["error"].engine_info["engine_id"] == eid


def test_display_data_and_execute_result(dv):
    ar = dv.execute(
        "from IPython.display import display, HTML\ndisplay(HTML('<b>x</b>'))\n6 * 7",
        silent=False,
        block=False,
    )
    replies = ar.get(timeout=10)
    ar.wait_for_output(timeout=10)
    for outputs in ar.outputs:
        assert outputs[0]["data"]["text/html"] == "<b>x</b>"
    for reply, result in zip(replies, ar.execute_result):
        assert result["data"]["text/plain"] == "42"
        assert reply.execution_count == result["execution_count"]


def test_clear(dv):
    dv.push({"to_be_cleared": 1})
    dv.clear(block=True)
    with pytest.raises(error.CompositeError) as info:
        dv.pull("to_be_cleared")
    assert "NameError" in str(info.value)


def test_abort_queued_request(cluster):
    rc = cluster.client
    view = rc[cluster.py_ids[0]]
    view.block = False
    slow = view.apply(time.sleep, 1.0)
    queued = view.apply(double, 1)
    rc.abort(queued, block=True)
    assert slow.get(timeout=10) is None
    with pytest.raises(error.TaskAborted):
        queued.get(timeout=10)
    assert view.apply_sync(double, 2) == 4


def _interrupt_when_running(rc, ar, eid):
    wait_until(lambda: rc.queue_status(targets=[eid])[eid]["queue"] >= 1, 10, "task running")
    time.sleep(0.3)
    rc.send_signal(signal.SIGINT, targets=[eid], block=True)


def test_interrupt_execute_and_recover(cluster):
    rc = cluster.client
    eid = cluster.py_ids[0]
    view = rc[eid]
    ar = view.execute("import time\ntime.sleep(60)", block=False)
    _interrupt_when_running(rc, ar, eid)
    with pytest.raises(error.RemoteError) as info:
        ar.get(timeout=20)
    assert info.value.ename == "KeyboardInterrupt"
    assert info.value.engine_info["engine_id"] == eid
    assert view.apply_sync(double, 3) == 6


def test_interrupt_apply_and_recover(cluster):
    rc = cluster.client
    eid = cluster.py_ids[1]
    view = rc[eid]
    ar = view.apply_async(time.sleep, 60)
    _interrupt_when_running(rc, ar, eid)
    with pytest.raises(error.RemoteError) as info:
        ar.get(timeout=20)
    assert info.value.ename == "KeyboardInterrupt"
    assert view.apply_sync(double, 4) == 8


def test_binary_garbage_output(dv):
    code = textwrap.dedent(
        """
        import os, sys
        print('surrogates: \\udcff\\udc80 and \\ud800 ok')
        sys.stdout.flush()
        os.write(1, b'raw bytes: \\xff\\xfe\\xfa end\\n')
        os.system('printf "shell \\\\377 end\\\\n"')
        """
    )
    ar = dv.execute(code, block=False)
    ar.get(timeout=20)
    ar.wait_for_output(timeout=10)
    for out in ar.stdout:
        assert "surrogates: \ufffd\ufffd and \ufffd ok" in out
        assert "raw bytes: \ufffd\ufffd\ufffd end" in out
        assert "shell \ufffd end" in out
    assert dv.apply_sync(double, 5) == [10, 10]


def test_input_is_not_supported(dv):
    with pytest.raises(error.CompositeError) as info:
        dv.execute("input('?')")
    assert "StdinNotImplementedError" in str(info.value)


def test_unmet_dependency_is_rescheduled_then_impossible(cluster):
    lview = cluster.client.load_balanced_view(cluster.py_ids)

    @ipp.require("pxfabric_module_that_does_not_exist")
    @ipp.interactive
    def needs_missing():
        return 1

    ar = lview.apply_async(needs_missing)
    with pytest.raises(error.RemoteError) as info:
        ar.get(timeout=20)
    assert info.value.ename == "ImpossibleDependency"


def test_data_publication(dv):
    @ipp.interactive
    def publish():
        from ipyparallel.engine.datapub import publish_data

        publish_data({"progress": 0.5, "arr": __import__("numpy").arange(3)})
        return True

    ar = dv.apply_async(publish)
    ar.get(timeout=10)
    ar.wait_for_output(timeout=10)
    for data in ar.data:
        assert data["progress"] == 0.5
        assert list(data["arr"]) == [0, 1, 2]


def test_stock_engine_and_pyengine_agree_on_results(cluster):
    rc = cluster.client
    both = rc[[cluster.py_ids[0], cluster.stock_id]]
    both.block = True
    assert both.apply_sync(double, 8) == [16, 16]
    both.execute("parity = [1, 2, 3]")
    assert both.pull("parity") == [[1, 2, 3], [1, 2, 3]]


PX_SCRIPT = textwrap.dedent(
    """
    import sys
    import ipyparallel as ipp
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    rc = ipp.Client(sys.argv[1], timeout=30)
    view = rc[[int(x) for x in sys.argv[2].split(",")]]
    view.block = True
    view.activate()
    shell.run_cell("%px px_value = 5")
    shell.run_cell("%px print('hi from', px_value)")
    shell.run_cell("%px px_value * 2")
    shell.run_cell("%px 1/0")
    rc.close()
    """
)


def test_px_magics_through_interactive_shell(cluster):
    ids = cluster.py_ids
    proc = subprocess.run(
        [PYTHON, "-c", PX_SCRIPT, str(cluster.cluster.client_file), ",".join(map(str, ids))],
        capture_output=True, text=True, timeout=90,
    )
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    assert proc.returncode == 0, out
    for eid in ids:
        assert re.search(rf"\[stdout:{eid}\]\s*hi from 5\n", out), out
        assert re.search(rf"Out\[{eid}:\d+\]: 10\n", out), out
        assert re.search(rf"\[{eid}:execute\]", out), out
    assert "ZeroDivisionError: division by zero" in out


def test_shutdown_unregisters_engine(cluster):
    rc = cluster.client
    cl = cluster.cluster
    uuid = cl.start_pyengine()
    wait_until(lambda: uuid in rc._engines.values(), 60, "extra pyengine registration")
    eid = next(i for i, u in rc._engines.items() if u == uuid)
    assert rc[eid].apply_sync(double, 1) == 2
    rc.shutdown(targets=[eid], block=True)
    popen = cl.engines[uuid]["popen"]
    popen.wait(timeout=20)
    assert popen.returncode == 0
    wait_until(lambda: eid not in rc.ids, 20, "unregistration")
