"""Remote errors as the client sees them through the controller, and aborting queued work."""

from __future__ import annotations

import os
import re
import time

import pytest
from ipyparallel import CompositeError, RemoteError, interactive
from ipyparallel.error import TaskAborted

from cluster import wait_for_gate, wait_until

ENGINES = 4

pytestmark = pytest.mark.timeout(90)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@interactive
def boom(msg):
    raise ValueError(msg)


@interactive
def boom_on(pids, msg):
    import os

    if os.getpid() in pids:
        raise KeyError(msg)
    return "fine"


@interactive
def answer():
    return 42


def test_remote_error_direct(rc):
    with pytest.raises(RemoteError) as excinfo:
        rc[2].apply_sync(boom, "boom 42")
    err = excinfo.value
    assert err.ename == "ValueError"
    assert err.evalue == "boom 42"
    assert err.engine_info["engine_id"] == 2
    assert err.engine_info["engine_uuid"] == rc._engines[2]
    assert "boom 42" in ANSI.sub("", err.traceback)
    assert "ValueError" in str(err) and "boom 42" in str(err)


def test_remote_error_async_result(rc):
    ar = rc[1].apply_async(boom, "later")
    with pytest.raises(RemoteError) as excinfo:
        ar.get(timeout=30)
    assert excinfo.value.ename == "ValueError"
    assert ar.ready() and not ar.successful()
    assert ar.metadata["status"] == "error"
    assert ar.engine_id == 1


def test_remote_error_load_balanced(rc):
    ar = rc.load_balanced_view().apply_async(boom, "lb boom")
    with pytest.raises(RemoteError) as excinfo:
        ar.get(timeout=30)
    err = excinfo.value
    assert (err.ename, err.evalue) == ("ValueError", "lb boom")
    assert err.engine_info["engine_id"] in rc.ids
    assert ar.engine_id == err.engine_info["engine_id"]


def test_remote_error_execute_single(rc):
    with pytest.raises(RemoteError) as excinfo:
        rc[0].execute("1/0", block=True)
    assert excinfo.value.ename == "ZeroDivisionError"


def _check_composite(err, n, method, ename):
    assert isinstance(err, CompositeError)
    assert len(err.elist) == n
    ids = sorted(e[3]["engine_id"] for e in err.elist)
    text = ANSI.sub("", str(err))
    rendered = ANSI.sub("", "\n".join(err.render_traceback()))
    for eid in ids:
        assert f"[{eid}:{method}]: {ename}" in text, text
        assert f"[{eid}:{method}]" in rendered
    assert all(e[0] == ename for e in err.elist)
    return ids


def test_composite_error_apply(rc):
    with pytest.raises(CompositeError) as excinfo:
        rc[:].apply_sync(boom, "all of them")
    ids = _check_composite(excinfo.value, ENGINES, "apply", "ValueError")
    assert ids == sorted(rc.ids)
    assert all(e[1] == "all of them" for e in excinfo.value.elist)
    with pytest.raises(RemoteError) as one:
        excinfo.value.raise_exception(0)
    assert one.value.ename == "ValueError"


def test_composite_error_execute(rc):
    with pytest.raises(CompositeError) as excinfo:
        rc[:].execute("1/0", block=True)
    ids = _check_composite(excinfo.value, ENGINES, "execute", "ZeroDivisionError")
    assert ids == sorted(rc.ids)


def test_composite_error_from_some_engines(rc, cluster):
    odd = [cluster.engine_pids[i] for i in rc.ids if i % 2]
    ar = rc[:].apply_async(boom_on, odd, "odd one")
    with pytest.raises(CompositeError) as excinfo:
        ar.get(timeout=30)
    ids = _check_composite(excinfo.value, len(odd), "apply", "KeyError")
    assert ids == [i for i in sorted(rc.ids) if i % 2]
    # The engines that did not fail still delivered ok replies.
    status = {md["engine_id"]: md["status"] for md in ar.metadata}
    assert status == {i: ("error" if i % 2 else "ok") for i in rc.ids}


def test_broadcast_errors(rc):
    with pytest.raises(CompositeError) as excinfo:
        rc.broadcast_view().apply_sync(boom, "bcast")
    ids = _check_composite(excinfo.value, ENGINES, "apply", "ValueError")
    assert ids == sorted(rc.ids)


def _gated(tmp_path, name):
    gate = str(tmp_path / name)
    return gate, (lambda: os.path.exists(gate + ".started")), (lambda: open(gate, "w").close())


def test_abort_queued_direct_task(rc, tmp_path):
    gate, started, release = _gated(tmp_path, "gate")
    blocker = rc[1].apply_async(wait_for_gate, gate, 60)
    try:
        queued = rc[1].apply_async(answer)
        wait_until(started, 30, what="the blocking task to start")
        aborting = rc.abort(queued, targets=[1], block=False)
        # The stock engine handles control messages only between tasks; give the abort
        # request time to reach the engine before the blocking task ends.
        time.sleep(2.0)
    finally:
        release()
    assert blocker.get(timeout=30) == "released"
    with pytest.raises(TaskAborted):
        queued.get(timeout=30)
    replies = aborting.result(timeout=30)
    assert [(r["msg_type"], r["content"]["status"]) for r in replies] == [("abort_reply", "ok")]
    assert rc[1].apply_sync(answer) == 42


def test_abort_queued_load_balanced_task(rc, tmp_path):
    gate, started, release = _gated(tmp_path, "gate")
    lview = rc.load_balanced_view(targets=[3])
    blocker = lview.apply_async(wait_for_gate, gate, 60)
    try:
        queued = lview.apply_async(answer)
        wait_until(started, 30, what="the blocking task to start")
        aborting = rc.abort(queued, targets=[3], block=False)
        time.sleep(2.0)
    finally:
        release()
    assert blocker.get(timeout=30) == "released"
    with pytest.raises(TaskAborted):
        queued.get(timeout=30)
    replies = aborting.result(timeout=30)
    assert [(r["msg_type"], r["content"]["status"]) for r in replies] == [("abort_reply", "ok")]
    assert lview.apply_sync(answer) == 42
