"""Side by side: a fresh stock ``ipengine`` and a fresh pyengine get the same requests.

Replies and IOPub messages are compared field by field after replacing the engine's uuid, id
and timestamps with placeholders (``rawclient.normalize``), so any difference a client could
see shows up here. Two differences are deliberate (ipyparallel 8.2+ behaviour) and folded by
``normalize``: the real ``engine_id`` in ``engine_info``, and one IOPub ``error`` per failed
apply instead of two.
"""

from __future__ import annotations

import time

import pytest

import ipyparallel as ipp
from ipyparallel.serialize import pack_apply_message

from harness import wait_until
from rawclient import RawClient, normalize


@ipp.interactive
def chatty(x, y=2):
    import sys

    print("out", x)
    print("err", y, file=sys.stderr)
    return {"x": x, "y": [y, (1, 2)], "z": b"bytes" * 400}


@ipp.interactive
def fails(n):
    def inner(k):
        return 1 / k

    return inner(n)


@ipp.interactive
def unmet():
    from ipyparallel.error import UnmetDependency

    raise UnmetDependency()


@pytest.fixture(scope="module")
def pair(cluster):
    """(raw client, [(uuid, id) of a fresh stock engine, (uuid, id) of a fresh pyengine])."""
    cl = cluster.cluster
    rc = cluster.client
    before = set(rc._engines.values())
    py_uuid = cl.start_pyengine()
    stock_pid = cl.start_stock_engine()
    wait_until(lambda: len(set(rc._engines.values()) - before) >= 2, 90, "two fresh engines")
    fresh = {u: i for i, u in rc._engines.items() if u not in before}
    stock_uuid = next(u for u in fresh if u != py_uuid)
    raw = RawClient(cl.client_file)
    try:
        yield raw, [(stock_uuid, fresh[stock_uuid]), (py_uuid, fresh[py_uuid])]
    finally:
        raw.close()
        cl.procs.stop([stock_pid, cl.engines[py_uuid]["pid"]])


def both(pair, action):
    """Run ``action(raw, uuid)`` on the stock engine, then the pyengine; return normalized."""
    raw, engines = pair
    return [normalize(action(raw, uuid), uuid, eid) for uuid, eid in engines]


def assert_same(pair, action):
    stock, ours = both(pair, action)
    assert ours[0] == stock[0], "reply differs"
    assert ours[1] == stock[1], "IOPub messages differ"
    return ours


def test_apply_ok_with_output(pair):
    (reply, iopub) = assert_same(pair, lambda raw, u: raw.apply(u, chatty, 3, y=4))
    assert reply[1] == "apply_reply" and reply[4] == 2  # pickle + one raw bytes frame
    assert [m[1] for m in iopub] == ["status", "stream", "stream", "status"]


def test_apply_error(pair):
    reply, iopub = assert_same(pair, lambda raw, u: raw.apply(u, fails, 0))
    assert reply[2]["ename"] == "ZeroDivisionError"
    assert [m[1] for m in iopub] == ["status", "error", "status"]


def test_apply_broadcast_metadata(pair):
    md = {"is_broadcast": True, "is_coalescing": True, "original_msg_id": "orig-1",
          "targets": [["x", 0]]}
    reply, _ = assert_same(pair, lambda raw, u: raw.apply(u, chatty, 1, metadata=md))
    assert reply[3]["original_msg_id"] == "orig-1" and reply[3]["is_coalescing"] is True


def test_apply_unmet_dependency(pair):
    reply, _ = assert_same(pair, lambda raw, u: raw.apply(u, unmet))
    assert reply[3]["dependencies_met"] is False


@pytest.mark.parametrize(
    "code, silent",
    [
        ("a = 5\nprint('p')\na", False),
        ("b = 6\nb", True),
        ("undefined_name", False),
        ("1 +", False),
        ("from IPython.display import display, HTML, clear_output\n"
         "display(HTML('<b>x</b>'), metadata={'k': (1, 2)})\nclear_output(wait=True)", False),
        ("%who_ls", False),
        ("!echo from-the-shell", False),
        ("input('?')", False),
        ("import sys\nprint('to err', file=sys.stderr)\nget_ipython().execution_count", False),
        ("exec(compile('7 * 6', '<x>', 'single'))\n_", False),
    ],
    ids=["result", "silent", "name-error", "syntax-error", "display", "magic", "shell",
         "input", "stderr", "sys-displayhook"],
)
def test_execute(pair, code, silent):
    assert_same(pair, lambda raw, u: raw.execute(u, code, silent=silent))


def test_control_clear_and_abort(pair):
    assert_same(pair, lambda raw, u: raw.control_request(u, "clear_request", {}))

    def abort_then_apply(raw, uuid):
        raw.control_request(uuid, "abort_request", {"msg_ids": ["will-be-aborted"]})
        bufs = pack_apply_message(chatty, (1,), {})
        msg = raw.session.msg("apply_request", {}, metadata={})
        msg["header"]["msg_id"] = msg["msg_id"] = "will-be-aborted"
        raw.session.send(raw.mux, msg, ident=uuid.encode(), buffers=bufs)
        return raw.collect(raw.mux, "will-be-aborted", expect_idle=False)

    reply, iopub = assert_same(pair, abort_then_apply)
    assert reply[2] == {"status": "aborted"}
    assert [m[1] for m in iopub] == ["status"]  # stock sends busy but no idle here


def test_execute_after_error_is_aborted(pair):
    def burst(raw, uuid):
        first = raw.send(uuid, "execute_request",
                         {"code": "import time\ntime.sleep(0.5)\n1/0", "silent": False,
                          "user_expressions": {}})
        second = raw.send(uuid, "execute_request",
                          {"code": "after = 1", "silent": False, "user_expressions": {}})
        ex1 = raw.collect(raw.mux, first)
        ex2 = raw.collect(raw.mux, second)
        ex2.iopub = ex1.iopub + ex2.iopub
        return ex2

    reply, _ = assert_same(pair, burst)
    assert reply[2] == {"status": "aborted"}


def test_interrupt_execute(pair):
    def interrupted(raw, uuid):
        msg_id = raw.send(uuid, "execute_request",
                          {"code": "import time\ntime.sleep(30)", "silent": False,
                           "user_expressions": {}})
        time.sleep(1.0)
        sig = raw.control_request(uuid, "signal_request", {"sig": "SIGINT"}, expect_idle=False)
        assert sig.reply["content"] == {"status": "ok"}
        assert sig.reply["msg_type"] == "_request"
        return raw.collect(raw.mux, msg_id)

    reply, _ = assert_same(pair, interrupted)
    assert reply[2]["ename"] == "KeyboardInterrupt"
