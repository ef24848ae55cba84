"""``pxfabric.host``: the functions pxengine's C++ host (mpi/pyhost.cpp) calls, without MPI.

The bridge takes the raw JSON frames of a request and hands back JSON bytes, so these tests
call it as pyhost.cpp does: with bytes in, and check the bytes out. Most cases use a recording
stand-in for the runtime; the ones that need a real ``EngineRuntime`` (it changes process state:
signals, streams, the IPython shell) or change logging and signal handlers run in a fresh
/usr/bin/python3, as an engine starts.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pxfabric import host

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"


# -- pack / _loads ------------------------------------------------------------------------------
def test_pack_is_utf8_json_without_ascii_escapes():
    assert host.pack({"a": [1, 2.5, None, True], "text": "héllo ✓"}) == \
        '{"a": [1, 2.5, null, true], "text": "héllo ✓"}'.encode()


def test_pack_uses_jupyter_clients_json_default():
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)
    out = json.loads(host.pack({"date": when, "raw": b"ab", "n": np.int64(3), "x": np.float32(1.5)}))
    # bytes as base64 with its trailing newline (jupyter_client's encodebytes), as on stock
    assert out == {"date": "2026-01-02T03:04:05.000006Z", "raw": "YWI=\n", "n": 3, "x": 1.5}


def test_pack_falls_back_to_json_clean():
    # NaN is refused by the first attempt (allow_nan=False), then written as ipykernel does.
    assert host.pack({"x": float("nan")}) == b'{"x": NaN}'
    assert json.loads(host.pack({"s": {3}, "t": (1, 2)})) == {"s": [3], "t": [1, 2]}


def test_pack_keeps_undecodable_bytes_of_a_str():
    # str from surrogateescape-decoded bytes (file names, captured output) goes out as the bytes.
    assert host.pack("a\udcffb") == b'"a\xffb"'


@pytest.mark.parametrize("frame, expected", [
    (b"", {}), (None, {}), (b"{}", {}), (b'{"k": 1}', {"k": 1}), (b"[1, 2]", {}), (b"3", {}),
    (b'"text"', {}),
])
def test_loads_gives_a_dict(frame, expected):
    assert host._loads(frame) == expected


# -- run_shell / run_control against a stand-in runtime ---------------------------------------
class FakeRuntime:
    """Records what the bridge passes and answers what it is told to."""

    def __init__(self, shell_reply=None, control_reply=None):
        self.shell_reply = shell_reply
        self.control_reply = control_reply
        self.calls = []
        self.shutdown_requested = False
        self.exit_requested = False
        self.output_pending = False
        self.flushed = 0
        self.interrupted = 0

    def handle_shell(self, msg_type, header, md, content, bufs, received):
        self.calls.append(("shell", msg_type, header, md, content, bufs, received))
        return self.shell_reply

    def handle_control(self, msg_type, header, content):
        self.calls.append(("control", msg_type, header, content))
        return self.control_reply

    def flush_output(self):
        self.flushed += 1

    def interrupt(self):
        self.interrupted += 1
        return True


HEADER = {"msg_id": "m1", "msg_type": "apply_request", "session": "s", "username": "u",
          "date": "2026-01-01T00:00:00.000001Z", "version": "5.3"}


def frames(*objs):
    return [json.dumps(o).encode() for o in objs]


def test_run_shell_decodes_the_frames_and_packs_the_reply():
    bufs = [memoryview(b"xyz")]
    rt = FakeRuntime(shell_reply=("apply_reply", {"status": "ok"}, {"engine": "u"}, (b"r1", b"r2")))
    header, md, content = frames(HEADER, {"targets": [1]}, {"code": "é"})
    reply, down = host.run_shell(rt, header, md, content, bufs, 12.5)
    assert rt.calls == [("shell", "apply_request", HEADER, {"targets": [1]}, {"code": "é"}, bufs, 12.5)]
    assert reply == ("apply_reply", b'{"status": "ok"}', b'{"engine": "u"}', [b"r1", b"r2"])
    assert down is False


def test_run_shell_empty_frames_and_no_reply():
    rt = FakeRuntime(shell_reply=None)
    assert host.run_shell(rt, frames(HEADER)[0], b"", b"", [], 0.0) == (None, False)
    assert rt.calls[0][3:5] == ({}, {})


@pytest.mark.parametrize("shutdown, exit_, down", [
    (False, False, False), (True, False, True), (False, True, True)])
def test_run_shell_reports_an_engine_that_stops(shutdown, exit_, down):
    rt = FakeRuntime(shell_reply=("execute_reply", {}, {}, []))
    rt.shutdown_requested, rt.exit_requested = shutdown, exit_
    assert host.run_shell(rt, frames(HEADER)[0], b"{}", b"{}", [], 0.0)[1] is down
    rt.shell_reply = None
    assert host.run_shell(rt, frames(HEADER)[0], b"{}", b"{}", [], 0.0) == (None, down)


def test_run_control_decodes_and_packs():
    rt = FakeRuntime(control_reply=("clear_reply", {"status": "ok"}, {"engine": "u"}))
    h = dict(HEADER, msg_type="clear_request")
    header, content = frames(h, {"x": [1]})
    assert host.run_control(rt, header, content) == (
        ("clear_reply", b'{"status": "ok"}', b'{"engine": "u"}'), False)
    assert rt.calls == [("control", "clear_request", h, {"x": [1]})]


def test_run_control_shutdown_and_no_reply():
    rt = FakeRuntime(control_reply=None)
    rt.exit_requested = True  # only a shutdown_request stops the engine from the control side
    assert host.run_control(rt, frames(HEADER)[0], b"") == (None, False)
    rt.shutdown_requested = True
    assert host.run_control(rt, frames(HEADER)[0], b"{}") == (None, True)


def test_flush_only_when_output_is_pending_and_interrupt():
    rt = FakeRuntime()
    host.flush(rt)
    assert rt.flushed == 0
    rt.output_pending = True
    host.flush(rt)
    assert rt.flushed == 1
    assert host.interrupt(rt) is True and rt.interrupted == 1


# -- with a real runtime, in a fresh interpreter ----------------------------------------------
PRELUDE = f"""
import json, os, signal, sys, threading
sys.path.insert(0, {str(PYTHON_DIR)!r})
from pxfabric import _lazy
_lazy.prepare_engine()
import pxfabric.engine
from pxfabric import host
"""


def run(body: str) -> str:
    env = dict(os.environ)
    env.pop("PXF_EAGER_IMPORTS", None)
    p = subprocess.run(["/usr/bin/python3", "-c", PRELUDE + textwrap.dedent(body)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_importing_the_bridge_keeps_start_up_light():
    out = run("""
        heavy = ["distutils", "setuptools", "prompt_toolkit", "IPython.terminal", "ipyparallel.client",
                 "jupyter_client.manager", "jedi", "pxfabric.stuck"]
        print(sorted(m for m in heavy if m in sys.modules))
    """)
    assert out.strip() == "[]"


def test_runtime_through_the_bridge(tmp_path):
    out = run(f"""
        import tempfile
        os.environ["IPYTHONDIR"] = tempfile.mkdtemp()
        published = []
        def publish(msg_type, content, parent, metadata, buffers, topic):
            published.append((msg_type, host.pack(content), topic))
        rt = host.make_runtime(3, "uuid-3", publish, {str(tmp_path)!r}, False)
        rt.restore_streams()
        print(type(rt).__name__, rt.engine_id, rt.engine_uuid)
        h = {{"msg_id": "e1", "msg_type": "execute_request", "session": "s", "username": "u",
              "date": "2026-01-01T00:00:00.000001Z", "version": "5.3"}}
        code = json.dumps({{"code": "print('hi'); 6 * 7", "silent": False}}).encode()
        rt.install_streams()
        reply, down = host.run_shell(rt, json.dumps(h).encode(), b"", code, [], 0.0)
        rt.restore_streams()
        t, c, m, b = reply
        print(t, json.loads(c)["status"], json.loads(m)["engine"], b, down)
        print([p[0] for p in published])
        print([json.loads(p[1])["data"]["text/plain"] for p in published if p[0] == "execute_result"])
        h2 = dict(h, msg_id="c1", msg_type="clear_request")
        reply, down = host.run_control(rt, json.dumps(h2).encode(), b"{{}}")
        print(reply[0], json.loads(reply[1]), down, "_" not in rt.shell.user_ns)
        info = json.dumps({{"status": "ok", "rank": 0, "engine_id": 3, "state": "busy"}}).encode()
        state = json.loads(host.where_state(rt, info))
        print(state["rank"], state["engine_id"], "where" in state or "frames" in state)
        h3 = dict(h, msg_id="s1", msg_type="shutdown_request")
        reply, down = host.run_control(rt, json.dumps(h3).encode(), b'{{"restart": false}}')
        print(reply[0], down)
        rt.close()
    """)
    lines = out.splitlines()
    assert lines[0] == "EngineRuntime 3 uuid-3"
    assert lines[1] == "execute_reply ok uuid-3 [] False"
    assert lines[2] == "['status', 'execute_input', 'stream', 'execute_result', 'status']"
    assert lines[3] == "['42']"
    assert lines[4] == "clear_reply {'status': 'ok'} False True"
    assert lines[5] == "0 3 True"
    assert lines[6] == "shutdown_reply True"


def test_setup_logging_writes_to_the_given_fd(tmp_path):
    log = tmp_path / "log"
    run(f"""
        import logging
        fd = os.open({str(log)!r}, os.O_WRONLY | os.O_CREAT)
        host.setup_logging(fd, 20)
        os.close(fd)  # the handler writes to a dup of it
        logging.getLogger("pxfabric.test").info("hello %s", "there")
        logging.getLogger("pxfabric.test").debug("not shown")
    """)
    text = log.read_text()
    assert "INFO pxfabric.test: hello there" in text and "[pxengine " in text
    assert "not shown" not in text


def test_setup_stack_dump_answers_without_blocking():
    out = run("""
        import select, time
        sig = signal.SIGRTMIN + 7
        r = host.setup_stack_dump(sig)
        def where_main_thread_is():
            signal.pthread_kill(threading.main_thread().ident, sig)
            time.sleep(0.2)
        where_main_thread_is()
        select.select([r], [], [], 5)
        dump = os.read(r, 65536).decode()
        print("where_main_thread_is" in dump, 'File "' in dump)
        print(os.get_blocking(r))
    """)
    assert out.splitlines() == ["True True", "False"]
