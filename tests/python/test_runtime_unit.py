"""``EngineRuntime`` called directly (no sockets): reply and IOPub shapes per protocol §5."""

from __future__ import annotations

import itertools
import signal
import threading
import time
import uuid as uuidlib

import numpy as np
import pytest

import ipyparallel as ipp
from ipyparallel.serialize import deserialize_object, pack_apply_message

from pxfabric.engine import EngineRuntime
from pxfabric.jsonsafe import clean_text, dumps, jsonable

ENGINE_ID = 5
UUID = str(uuidlib.uuid4())
REPLY_MD_KEYS = ["started", "dependencies_met", "engine", "is_broadcast", "is_coalescing",
                 "original_msg_id", "status"]
_ids = itertools.count()


class Recorder:
    """Collects what the runtime publishes, thread-safely."""

    def __init__(self):
        self.msgs = []
        self.lock = threading.Lock()

    def __call__(self, msg_type, content, parent, metadata, buffers, topic):
        assert isinstance(topic, bytes) and isinstance(buffers, list)
        dumps(content), dumps(metadata), dumps(parent)  # must be JSON-ready
        with self.lock:
            self.msgs.append(dict(msg_type=msg_type, content=content, parent=parent,
                                  metadata=metadata, buffers=buffers, topic=topic))

    def types(self):
        return [m["msg_type"] for m in self.msgs]

    def of(self, msg_type):
        return [m for m in self.msgs if m["msg_type"] == msg_type]


@pytest.fixture(scope="module")
def rec():
    return Recorder()


@pytest.fixture(scope="module")
def rt(rec, tmp_path_factory):
    profile = tmp_path_factory.mktemp("profile")
    (profile / "startup").mkdir()
    (profile / "startup" / "00-start.py").write_text("from_startup_file = 'yes'\n")
    runtime = EngineRuntime(ENGINE_ID, UUID, rec, profile_dir=str(profile),
                            install_streams=False, exec_lines=["from_exec_lines = 41 + 1"])
    yield runtime
    runtime.close()


@pytest.fixture(autouse=True)
def clean_recorder(rt, rec):
    rec.msgs.clear()


class engine_streams:
    """Install the engine's sys.stdout/err only around a call: pytest's capture swaps them
    between test phases."""

    def __init__(self, rt):
        self.rt = rt

    def __enter__(self):
        self.rt.install_streams()

    def __exit__(self, *exc):
        self.rt.restore_streams()


def shell(rt, *args):
    with engine_streams(rt):
        return rt.handle_shell(*args)


def header(msg_type):
    return {"msg_id": f"client-{next(_ids)}_1_{next(_ids)}", "msg_type": msg_type,
            "username": "u", "session": "client-session", "date": "2026-01-01T00:00:00.000001Z",
            "version": "5.3"}


def apply(rt, f, *args, metadata=None, **kwargs):
    h = header("apply_request")
    return h, shell(rt, "apply_request", h, metadata or {}, {}, pack_apply_message(f, args, kwargs))


def execute(rt, code, silent=False, received=None, **extra):
    h = header("execute_request")
    content = {"code": code, "silent": silent, "user_expressions": {}, **extra}
    return h, shell(rt, "execute_request", h, {}, content, [], received)


def topic(kind):
    return f"engine.{ENGINE_ID}.{kind}".encode()


@ipp.interactive
def add(a, b=1):
    print("adding", a, b)
    return a + b


@ipp.interactive
def boom():
    raise ValueError("bad value")


# -- apply ------------------------------------------------------------------------------------
def test_apply_ok_reply_and_iopub(rt, rec):
    h, (rtype, content, md, bufs) = apply(rt, add, 2, b=3)
    assert rtype == "apply_reply"
    assert content == {"status": "ok"}
    assert list(md) == REPLY_MD_KEYS
    assert md["engine"] == UUID and md["status"] == "ok" and md["dependencies_met"] is True
    assert md["is_broadcast"] is False and md["is_coalescing"] is False
    assert md["original_msg_id"] == ""
    assert md["started"].endswith("Z")
    assert deserialize_object(bufs)[0] == 5
    assert rec.types() == ["status", "stream", "status"]
    busy, stream, idle = rec.msgs
    assert busy["content"] == {"execution_state": "busy"} and busy["topic"] == topic("status")
    assert idle["content"] == {"execution_state": "idle"}
    assert stream["content"] == {"name": "stdout", "text": "adding 2 3\n"}
    assert stream["topic"] == topic("stdout")
    for m in rec.msgs:
        assert m["parent"] is h
        assert m["metadata"] == {"engine": UUID}


def test_apply_runs_in_user_namespace_with_stock_temporary_names(rt):
    @ipp.interactive
    def names():
        return sorted(k for k in globals() if k.startswith("_client"))

    h, reply = apply(rt, names)
    prefix = "_" + h["msg_id"].replace("-", "") + "_"
    assert deserialize_object(reply[3])[0] == [prefix + s for s in ("args", "f", "kwargs", "result")]
    assert not [k for k in rt.shell.user_ns if k.startswith("_client")]
    assert rt.shell.user_ns["from_startup_file"] == "yes"
    assert rt.shell.user_ns["from_exec_lines"] == 42


def test_apply_error_reply_and_single_iopub_error(rt, rec):
    h, (rtype, content, md, bufs) = apply(rt, boom)
    assert rtype == "apply_reply" and bufs == []
    assert list(content) == ["traceback", "ename", "evalue", "engine_info", "status"]
    assert content["ename"] == "ValueError" and content["evalue"] == "bad value"
    assert content["status"] == "error"
    assert content["engine_info"] == {"engine_uuid": UUID, "engine_id": ENGINE_ID, "method": "apply"}
    assert any("bad value" in line for line in content["traceback"])
    assert list(md) == REPLY_MD_KEYS + ["engine_info"]
    assert md["engine_info"] == {"engine_uuid": UUID, "engine_id": ENGINE_ID}
    assert md["status"] == "error"
    errors = rec.of("error")
    assert len(errors) == 1
    assert errors[0]["topic"] == topic("error")
    assert errors[0]["content"] == {k: content[k] for k in ("traceback", "ename", "evalue", "engine_info")}
    assert rec.types() == ["status", "error", "status"]


def test_apply_broadcast_metadata_is_copied(rt):
    md_in = {"is_broadcast": True, "is_coalescing": True, "original_msg_id": "orig",
             "targets": [["u", 1]]}
    _, (_, _, md, _) = apply(rt, add, 1, metadata=md_in)
    assert md["is_broadcast"] is True and md["is_coalescing"] is True
    assert md["original_msg_id"] == "orig"


def test_unmet_dependency_sets_dependencies_met_false(rt):
    @ipp.interactive
    def unmet():
        from ipyparallel.error import UnmetDependency

        raise UnmetDependency()

    _, (_, content, md, _) = apply(rt, unmet)
    assert content["ename"] == "UnmetDependency"
    assert md["dependencies_met"] is False and md["status"] == "error"


def test_numpy_result_buffers_are_bytes_like(rt):
    @ipp.interactive
    def arr():
        import numpy

        return numpy.arange(1000.0).reshape(10, 100)

    _, (_, _, _, bufs) = apply(rt, arr)
    assert len(bufs) == 2
    assert all(isinstance(b, bytes) or (b.ndim == 1 and b.format == "B") for b in bufs)
    np.testing.assert_array_equal(deserialize_object(bufs)[0], np.arange(1000.0).reshape(10, 100))


# -- execute ----------------------------------------------------------------------------------
def test_execute_result_counts_and_order(rt, rec):
    count = rt.shell.execution_count
    h, (rtype, content, md, bufs) = execute(rt, "print('p')\n6 * 7")
    assert rtype == "execute_reply" and bufs == []
    assert content == {"status": "ok", "execution_count": count, "user_expressions": {},
                       "payload": []}
    assert list(md) == REPLY_MD_KEYS
    assert rec.types() == ["status", "execute_input", "stream", "execute_result", "status"]
    ei = rec.of("execute_input")[0]
    assert ei["content"] == {"code": "print('p')\n6 * 7", "execution_count": count}
    assert ei["topic"] == topic("execute_input")
    er = rec.of("execute_result")[0]
    assert er["content"] == {"data": {"text/plain": "42"}, "metadata": {}, "execution_count": count}
    assert er["metadata"] == {} and er["topic"] == topic("execute_result")
    assert rt.shell.user_ns["Out"][count] == 42


def test_execute_silent(rt, rec):
    count = rt.shell.execution_count
    _, (_, content, _, _) = execute(rt, "silent_var = 1\nsilent_var", silent=True)
    assert content["execution_count"] == count - 1
    assert rt.shell.execution_count == count
    assert rec.types() == ["status", "status"]


def test_execute_error(rt, rec):
    _, (_, content, md, _) = execute(rt, "undefined_thing")
    assert list(content) == ["status", "traceback", "ename", "evalue", "engine_info",
                             "execution_count", "user_expressions", "payload"]
    assert content["ename"] == "NameError"
    assert content["engine_info"] == {"engine_uuid": UUID, "engine_id": ENGINE_ID,
                                      "method": "execute"}
    assert md["engine_info"] == {"engine_uuid": UUID, "engine_id": ENGINE_ID}
    (err,) = rec.of("error")
    assert set(err["content"]) == {"traceback", "ename", "evalue"}  # as ipykernel: no engine_info


def test_error_aborts_only_queued_execute_requests(rt):
    queued_at = time.monotonic()
    time.sleep(0.01)
    _, (_, content, _, _) = execute(rt, "1/0")
    assert content["status"] == "error"
    _, aborted = execute(rt, "x = 1", received=queued_at)
    assert aborted[0] == "execute_reply" and aborted[1] == {"status": "aborted"}
    assert aborted[2]["status"] == "aborted"
    _, ok = apply(rt, add, 1)  # apply requests are never aborted this way
    assert ok[1] == {"status": "ok"}
    _, later = execute(rt, "x = 1", received=time.monotonic())
    assert later[1]["status"] == "ok"
    queued_at = time.monotonic()
    _, silent_err = execute(rt, "1/0", silent=True)
    assert silent_err[1]["status"] == "error"
    _, not_aborted = execute(rt, "x = 2", received=queued_at)
    assert not_aborted[1]["status"] == "ok"  # errors in silent requests do not abort


def test_display_and_clear_output(rt, rec):
    execute(rt, "from IPython.display import display, HTML, clear_output\n"
                "display(HTML('<i>h</i>'), metadata={'t': (1, 2)})\nclear_output(wait=True)")
    (dd,) = rec.of("display_data")
    assert dd["content"] == {"data": {"text/plain": "<IPython.core.display.HTML object>",
                                      "text/html": "<i>h</i>"},
                             "metadata": {"t": [1, 2]}, "transient": {}}
    assert dd["metadata"] == {} and dd["topic"] == topic("displaypub")
    (co,) = rec.of("clear_output")
    assert co["content"] == {"wait": True} and co["metadata"] == {"engine": UUID}


def test_magics_shell_escape_and_get_ipython(rt, rec):
    execute(rt, "!echo via-shell\n%alias_magic pxtest_t time")
    out = "".join(m["content"]["text"] for m in rec.of("stream"))
    assert "via-shell" in out
    _, reply = execute(rt, "get_ipython().kernel.engine_id")
    assert rec.of("execute_result")[-1]["content"]["data"]["text/plain"] == str(ENGINE_ID)


def test_input_raises_stdin_not_implemented(rt):
    _, (_, content, _, _) = execute(rt, "input('?')")
    assert content["ename"] == "StdinNotImplementedError"
    import builtins

    assert builtins.input.__module__ != "pxfabric.engine"


def test_streams_are_flushed_before_the_reply_and_periodically(rt, rec, monkeypatch):
    monkeypatch.setattr(type(rt.stdout), "flush_interval", 0.05)
    execute(rt, "import time\nfor i in range(3):\n    print(i)\n    time.sleep(0.06)\n"
                "print('end', end='')")
    texts = [m["content"]["text"] for m in rec.of("stream")]
    assert "".join(texts) == "0\n1\n2\nend"
    assert len(texts) >= 2
    assert rec.types()[-1] == "status"


def test_flush_output_from_another_thread(rt, rec):
    stop = threading.Event()

    def flusher():
        while not stop.is_set():
            rt.flush_output()
            time.sleep(0.02)

    t = threading.Thread(target=flusher)
    t.start()
    try:
        execute(rt, "import time\nprint('a')\ntime.sleep(0.3)\nprint('b')")
    finally:
        stop.set()
        t.join()
    assert [m["content"]["text"] for m in rec.of("stream")] == ["a\n", "b\n"]


def test_binary_garbage_is_cleaned(rt, rec):
    _, (_, content, _, _) = execute(rt, "print('x\\udcff\\ud800y')\nraise ValueError('\\udcfe')")
    assert rec.of("stream")[0]["content"]["text"] == "x\ufffd\ufffdy\n"
    assert content["evalue"] == "\ufffd"
    dumps(content)


# -- interrupts -------------------------------------------------------------------------------
def _interrupt_soon(rt, delay=0.3):
    def go():
        deadline = time.monotonic() + 10
        while not rt.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        rt.interrupt()

    t = threading.Thread(target=go)
    t.start()
    return t


def test_keyboard_interrupt_in_execute(rt):
    t = _interrupt_soon(rt)
    start = time.monotonic()
    _, (_, content, md, _) = execute(rt, "import time\ntime.sleep(30)")
    t.join()
    assert time.monotonic() - start < 10
    assert content["ename"] == "KeyboardInterrupt" and md["status"] == "error"
    assert execute(rt, "1 + 1")[1][1]["status"] == "ok"


def test_keyboard_interrupt_in_apply(rt, rec):
    t = _interrupt_soon(rt)
    _, (_, content, _, _) = apply(rt, time.sleep, 30)
    t.join()
    assert content["ename"] == "KeyboardInterrupt"
    assert content["engine_info"]["method"] == "apply"
    assert len(rec.of("error")) == 1
    assert apply(rt, add, 1)[1][1] == {"status": "ok"}


def test_sigint_while_idle_is_ignored(rt):
    assert rt.interrupt() is False
    signal.raise_signal(signal.SIGINT)  # a stray real SIGINT between requests
    time.sleep(0.05)
    assert execute(rt, "2 + 2")[1][1]["status"] == "ok"


def test_interrupt_escaping_run_cell_still_replies(rt, monkeypatch):
    def run_cell(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rt.shell, "run_cell", run_cell)
    _, (_, content, md, _) = execute(rt, "1")
    assert content["status"] == "error" and content["ename"] == "KeyboardInterrupt"
    assert md["status"] == "error"


# -- control ----------------------------------------------------------------------------------
def test_abort_by_msg_id(rt, rec):
    h = header("abort_request")
    target = header("apply_request")
    reply = rt.handle_control("abort_request", h, {"msg_ids": [target["msg_id"]]})
    assert reply == ("abort_reply", {"status": "ok"}, {"engine": UUID})
    assert rec.types() == ["status", "status"] and rec.msgs[0]["parent"] is h
    rec.msgs.clear()
    rtype, content, md, bufs = shell(rt, "apply_request", target, {}, {},
                                     pack_apply_message(add, (1,), {}))
    assert (rtype, content, bufs) == ("apply_reply", {"status": "aborted"}, [])
    assert list(md) == REPLY_MD_KEYS and md["status"] == "aborted"
    assert rec.types() == ["status"]  # stock: busy, but no idle, for an abort by id
    assert target["msg_id"] not in rt.aborted


def test_abort_with_empty_list_aborts_queued_executes(rt):
    queued_at = time.monotonic()
    rt.handle_control("abort_request", header("abort_request"), {"msg_ids": []})
    assert execute(rt, "1", received=queued_at)[1][1] == {"status": "aborted"}
    assert execute(rt, "1", received=time.monotonic())[1][1]["status"] == "ok"


def test_clear_request(rt, rec):
    execute(rt, "to_clear = 1", silent=True)
    rec.msgs.clear()
    h = header("clear_request")
    assert rt.handle_control("clear_request", h, {}) == ("clear_reply", {"status": "ok"},
                                                          {"engine": UUID})
    assert "to_clear" not in rt.shell.user_ns
    assert [m["content"]["execution_state"] for m in rec.msgs] == ["busy", "idle"]
    assert all(m["parent"] is h for m in rec.msgs)


def test_shutdown_request(rt, rec):
    h = header("shutdown_request")
    try:
        reply = rt.handle_control("shutdown_request", h, {"restart": False})
        assert reply == ("shutdown_reply", {"status": "ok", "restart": False}, {"engine": UUID})
        assert rt.shutdown_requested
        assert rec.types() == ["status", "shutdown_reply", "status"]
        sd = rec.of("shutdown_reply")[0]
        assert sd["content"] == {"status": "ok", "restart": False}
        assert sd["metadata"] == {} and sd["topic"] == topic("shutdown") and sd["parent"] is h
    finally:
        rt.shutdown_requested = False
        rt.shell.exit_now = False


def test_signal_request_like_the_nanny(rt):
    assert rt.handle_control("signal_request", header("signal_request"), {"sig": "SIGINT"}) == (
        "_request", {"status": "ok"}, {})
    rtype, content, md = rt.handle_control("signal_request", header("signal_request"),
                                           {"sig": "NOT_A_SIGNAL"})
    assert rtype == "_request" and content["status"] == "error"
    assert content["ename"] == "AttributeError" and content["engine_info"] == {}
    rtype, content, md = rt.handle_control("signal_request", header("signal_request"), {"sig": 12345})
    assert content["status"] == "error" and content["ename"] == "ValueError"


def test_signal_request_replies_before_the_signal(rt):
    # A fatal signal must not end the engine before its reply left (the client waits for it).
    got = threading.Event()
    old = signal.signal(signal.SIGUSR1, lambda *a: got.set())
    try:
        reply = rt.handle_control("signal_request", header("signal_request"), {"sig": "SIGUSR1"})
        assert reply == ("_request", {"status": "ok"}, {})
        assert not got.is_set()  # not yet: the reply is returned first
        deadline = time.monotonic() + 5
        while not got.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)  # the handler runs on the main thread, between bytecodes
        assert got.is_set()
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_unknown_requests_get_no_reply(rt, rec):
    assert shell(rt, "comm_msg", header("comm_msg"), {}, {"comm_id": "x"}, []) is None
    assert rec.types() == ["status", "status"]
    assert rt.handle_control("kernel_info_request", header("kernel_info_request"), {}) is None


def test_exit_is_reported(rt):
    try:
        execute(rt, "exit()")
        assert rt.exit_requested
    finally:
        rt.shell.exit_now = False


def test_data_publication(rt, rec):
    @ipp.interactive
    def pub():
        from ipyparallel.engine.datapub import publish_data

        publish_data({"k": 1})

    apply(rt, pub)
    (dm,) = rec.of("data_message")
    assert dm["content"] == {"keys": ["k"]} and dm["topic"] == b"datapub"
    assert dm["metadata"] == {"engine": UUID}
    assert deserialize_object(dm["buffers"])[0] == {"k": 1}


# -- helpers ----------------------------------------------------------------------------------
def test_jsonsafe():
    assert clean_text("plain") == "plain"
    assert clean_text("é\udcc3\udca9") == "éé"  # surrogate-escaped UTF-8 is restored
    assert clean_text("\ud800") == "\ufffd"
    value = jsonable({1: (np.int64(2), float("nan")), "b": b"\x00", "s": {3}, "t": np.bool_(1)})
    assert value == {"1": [2, "nan"], "b": "AA==\n", "s": [3], "t": True}
    assert dumps({"t": "\udcff"}) == '{"t": "\ufffd"}'.encode()


def test_internal_failure_still_replies(rt, monkeypatch):
    import pxfabric.engine as engine_mod

    def broken(buffers):
        raise RuntimeError("runtime bug")

    monkeypatch.setattr(engine_mod, "_byte_buffers", broken)
    _, (rtype, content, md, bufs) = apply(rt, add, 1)
    assert rtype == "apply_reply" and bufs == []
    assert content["ename"] == "RuntimeError" and content["evalue"] == "runtime bug"
    assert content["engine_info"]["method"] == "apply" and md["status"] == "error"


def test_memoryview_results_are_flat_bytes(rt):
    @ipp.interactive
    def views():
        import numpy

        return memoryview(numpy.arange(600.0)[::2].copy()), numpy.arange(600.0)[::2]

    _, (_, content, _, bufs) = apply(rt, views)
    assert content == {"status": "ok"}
    assert all(isinstance(b, bytes) or (b.ndim == 1 and b.format == "B") for b in bufs)
    mv, arr = deserialize_object(bufs)[0]
    np.testing.assert_array_equal(np.frombuffer(mv, dtype=float), np.arange(600.0)[::2])
    np.testing.assert_array_equal(arr, np.arange(600.0)[::2])
