"""Cross-checks of the C++ wire codec (driven through build/bin/wire_tool) against the real
jupyter_client.session.Session: signatures, framing, buffers, non-ASCII text, replay rejection.

wire_tool reads JSON request lines on stdin and answers one JSON line each; frames are base64.
Run with: /usr/bin/python3 -m pytest tests/integration/test_codec_crosscheck.py
"""
import base64
import datetime
import hashlib
import hmac
import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import zmq
from jupyter_client.session import Session

REPO = Path(__file__).resolve().parents[2]
WIRE_TOOL = REPO / "build" / "bin" / "wire_tool"
KEY = "crosscheck-" + uuid.uuid4().hex
TIMEOUT = 30  # seconds per wire_tool run
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


@pytest.fixture(scope="module", autouse=True)
def wire_tool_built():
    if not WIRE_TOOL.is_file():
        pytest.fail(f"{WIRE_TOOL} is missing: build first (bash scripts/build.sh)", pytrace=False)


def b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def run_tool(requests, key=KEY, args=()):
    """Runs one wire_tool process (one C++ Session) over `requests`; returns (replies, pid)."""
    cmd = [str(WIRE_TOOL)] + (["--key", key] if key else []) + list(args)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate("".join(json.dumps(r) + "\n" for r in requests).encode(), timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, f"wire_tool exited {proc.returncode}: {err.decode(errors='replace')}"
    # Split on b"\n" only: str.splitlines() would also split inside raw U+2028 in a JSON string.
    replies = [json.loads(line) for line in out.split(b"\n") if line]
    assert len(replies) == len(requests), out
    for r in replies:
        assert "error" not in r, r["error"]  # a malformed request is a bug in this test
    return replies, proc.pid


def cpp_encode(key=KEY, args=(), **request):
    (reply,), pid = run_tool([dict(op="encode", **request)], key=key, args=args)
    assert reply["ok"], reply
    return [unb64(f) for f in reply["frames"]], pid


def decode_request(frames, **opts):
    return dict(op="decode", frames=[b64(f) for f in frames], **opts)


def py_session(key=KEY, **kw):
    return Session(key=key.encode(), signature_scheme=kw.pop("signature_scheme", "hmac-sha256"), packer="json", **kw)


def py_receive(session, frames, content=True):
    idents, msg_list = session.feed_identities(frames, copy=True)
    return idents, session.deserialize(msg_list, content=content)


def py_send(session, msg_type, content, *, parent=None, metadata=None, buffers=None, ident=None):
    """Frames exactly as Session.send puts them on a real ZMQ socket."""
    ctx = zmq.Context.instance()
    tx, rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    addr = f"inproc://crosscheck-{uuid.uuid4().hex}"
    try:
        tx.bind(addr)
        rx.connect(addr)
        msg = session.send(tx, msg_type, content=content, parent=parent, metadata=metadata, buffers=buffers, ident=ident)
        assert rx.poll(5000), "Session.send produced nothing within 5 s"
        return rx.recv_multipart(), msg
    finally:
        tx.close(linger=0)
        rx.close(linger=0)


NON_ASCII = "h\u00e9llo \u2713 \u65e5\u672c \U0001d11e \"quoted\" \\ back\nslash \x01 \u2028"
PICKLE_42 = b"\x80\x04K*."


# ------------------------------------------------------------------------------------------
# C++ -> jupyter_client


def test_cpp_signed_message_accepted_by_jupyter_client():
    parent = {"msg_id": "client_1_7", "msg_type": "apply_request", "session": "client", "version": "5.3"}
    content = {"status": "ok", "text": NON_ASCII}
    metadata = {"engine": "e-1", "dependencies_met": True, "n": [1, 2.5, None]}
    buffers = [PICKLE_42, b"", bytes(range(256)) * 40]
    frames, pid = cpp_encode(
        msg_type="apply_reply", identities=[b64(b"client-router-id")], parent=parent, metadata=metadata,
        content=content, buffers=[b64(b) for b in buffers], args=("--session", "cpp-session", "--username", "cpp"))

    # The signature is HMAC-SHA256 over the exact bytes of the four JSON frames.
    assert frames[1] == b"<IDS|MSG>"
    assert frames[2] == hmac.new(KEY.encode(), b"".join(frames[3:7]), hashlib.sha256).hexdigest().encode()
    assert json.loads(frames[3])["date"] and DATE_RE.match(json.loads(frames[3])["date"])

    idents, msg = py_receive(py_session(), frames)
    assert idents == [b"client-router-id"]
    assert msg["content"] == content
    assert msg["metadata"] == metadata
    assert msg["parent_header"]["msg_id"] == "client_1_7"
    assert [bytes(b) for b in msg["buffers"]] == buffers
    header = msg["header"]
    assert header["msg_type"] == "apply_reply"
    assert header["msg_id"] == f"cpp-session_{pid}_1"
    assert header["session"] == "cpp-session"
    assert header["username"] == "cpp"
    assert header["version"] == "5.3"
    # jupyter_client parses the date, unless ipyparallel (imported by another test in this
    # process) has switched that off globally; either way it must be our ISO-8601 UTC text.
    date = header["date"]
    if isinstance(date, datetime.datetime):
        assert date.tzinfo is not None
    else:
        assert DATE_RE.match(date), date


def test_cpp_msg_ids_unique_and_counted_like_jupyter_client():
    replies, pid = run_tool([{"op": "header", "msg_type": "status"}] * 3, args=("--session", "s-1"))
    ids = [r["header"]["msg_id"] for r in replies]
    assert ids == [f"s-1_{pid}_{n}" for n in (1, 2, 3)]
    # The same shape jupyter_client itself produces: "<session>_<pid>_<n>".
    ref = py_session(session="s-2").msg_header("status")["msg_id"]
    assert re.fullmatch(r"s-2_\d+_\d+", ref)


def test_cpp_sha512_scheme_accepted_by_jupyter_client():
    frames, _ = cpp_encode(msg_type="status", content={"execution_state": "idle"}, args=("--scheme", "hmac-sha512"))
    assert len(frames[1]) == 128
    _, msg = py_receive(py_session(signature_scheme="hmac-sha512"), frames)
    assert msg["content"] == {"execution_state": "idle"}


def test_cpp_message_rejected_by_jupyter_client_when_wrong_key_or_tampered():
    frames, _ = cpp_encode(msg_type="status", content={"execution_state": "busy"})
    with pytest.raises(ValueError, match="Invalid Signature"):
        py_receive(py_session(key="some-other-key"), frames)
    tampered = frames[:5] + [frames[5].replace(b"busy", b"idle")]
    with pytest.raises(ValueError, match="Invalid Signature"):
        py_receive(py_session(), tampered)


def test_replay_of_cpp_message_rejected_by_jupyter_client():
    frames, _ = cpp_encode(msg_type="status", content={"execution_state": "idle"})
    receiver = py_session()
    py_receive(receiver, list(frames))
    with pytest.raises(ValueError, match="Duplicate Signature"):
        py_receive(receiver, list(frames))


# ------------------------------------------------------------------------------------------
# jupyter_client -> C++

PY_MESSAGES = {
    "buffers": dict(msg_type="apply_request", content={"code": "f(x)"},
                    metadata={"targets": [0, 1], "after": [], "follow": [], "timeout": None},
                    buffers=[PICKLE_42, b"", b"\x00<IDS|MSG>\xff" * 1000], ident=[b"client-1"]),
    "non_ascii": dict(msg_type="stream", content={"name": "stdout", "text": NON_ASCII},
                      metadata={"engine": "\u00e9ngine"}, ident=[b"engine.0.stdout"]),
    "empty_metadata": dict(msg_type="status", content={"execution_state": "idle"}, metadata={}),
    "with_parent": dict(msg_type="apply_reply", content={"status": "ok"}, metadata={},
                        parent={"header": {"msg_id": "req_1_1", "msg_type": "apply_request", "session": "c",
                                           "username": "u", "date": "2026-11-21T15:50:56.826501Z",
                                           "version": "5.3"}},
                        ident=[b"a", b"b"]),
}


@pytest.mark.parametrize("case", sorted(PY_MESSAGES))
def test_jupyter_client_message_accepted_by_cpp(case):
    spec = dict(PY_MESSAGES[case])
    sender = py_session()
    frames, sent = py_send(sender, spec.pop("msg_type"), spec.pop("content"), **spec)
    (reply,), _ = run_tool([decode_request(frames)])
    assert reply["ok"], reply
    assert [unb64(i) for i in reply["identities"]] == spec.get("ident", [])
    assert reply["signature"] == frames[len(spec.get("ident", [])) + 1].decode()
    assert reply["header"]["msg_id"] == sent["header"]["msg_id"]
    assert reply["header"]["msg_type"] == sent["header"]["msg_type"]
    assert reply["header"]["session"] == sender.session
    assert DATE_RE.match(reply["header"]["date"]), reply["header"]["date"]
    assert reply["content"] == sent["content"]
    assert reply["metadata"] == sent["metadata"]
    if "parent" in spec:
        assert reply["parent"]["msg_id"] == "req_1_1"
    else:
        assert reply["parent"] == {}
    assert [unb64(b) for b in reply["buffers"]] == spec.get("buffers", [])


def test_replay_of_jupyter_client_message_rejected_by_cpp():
    frames, _ = py_send(py_session(), "apply_request", {"code": "1"}, ident=[b"c"])
    rerouted = [b"someone-else"] + frames[1:]  # new routing prefix, same signed frames
    replies, _ = run_tool([decode_request(frames), decode_request(frames), decode_request(rerouted),
                           {"op": "drops"}])
    assert replies[0]["ok"]
    assert replies[1] == {"ok": False, "reason": "replayed", "detail": replies[1]["detail"]}
    assert "replay" in replies[1]["detail"]
    assert replies[2]["reason"] == "replayed"
    assert replies[3]["counts"]["replayed"] == 2
    assert replies[3]["summary"] == "replayed=2"


def test_jupyter_client_message_rejected_by_cpp_when_wrong_key_tampered_or_unsigned():
    frames, _ = py_send(py_session(), "status", {"execution_state": "busy"})
    tampered = frames[:-1] + [frames[-1].replace(b"busy", b"idle")]
    unsigned, _ = py_send(Session(key=b"", packer="json"), "status", {"execution_state": "busy"})
    assert unsigned[1] == b""
    replies, _ = run_tool([decode_request(frames), decode_request(tampered), decode_request(unsigned)],
                          key="some-other-key")
    assert [r.get("reason") for r in replies] == ["bad_signature", "bad_signature", "unsigned_message"]
    assert all(r["detail"] for r in replies)


# ------------------------------------------------------------------------------------------
# Unsigned mode (empty key) in both directions


def test_unsigned_mode_interoperates():
    frames, _ = cpp_encode(key="", msg_type="status", content={"execution_state": "idle"})
    assert frames[1] == b""
    plain = Session(key=b"", packer="json")
    _, msg = py_receive(plain, frames)
    assert msg["content"] == {"execution_state": "idle"}
    with pytest.raises(ValueError, match="Unsigned Message"):
        py_receive(py_session(), frames)

    py_frames, _ = py_send(plain, "status", {"execution_state": "busy"})
    replies, _ = run_tool([decode_request(py_frames), decode_request(py_frames)], key="")
    assert [r["ok"] for r in replies] == [True, True]  # no key, no replay guard (as jupyter_client)
    assert replies[0]["content"] == {"execution_state": "busy"}


# ------------------------------------------------------------------------------------------
# Relaying: forward keeps the original signature, reencode re-signs


def test_forwarded_message_keeps_python_signature():
    frames, sent = py_send(py_session(), "apply_request", {"code": "g()"}, buffers=[PICKLE_42], ident=[b"client"])
    (reply,), _ = run_tool([dict(decode_request(frames), op="forward", identities=[b64(b"engine-uuid")])])
    assert reply["ok"], reply
    out = [unb64(f) for f in reply["frames"]]
    assert out == [b"engine-uuid"] + frames[1:]  # byte for byte after the new routing prefix
    idents, msg = py_receive(py_session(), out)
    assert idents == [b"engine-uuid"]
    assert msg["header"]["msg_id"] == sent["header"]["msg_id"]
    assert [bytes(b) for b in msg["buffers"]] == [PICKLE_42]


@pytest.mark.parametrize("parse_content", [True, False])
def test_reencoded_message_accepted_by_jupyter_client(parse_content):
    frames, sent = py_send(py_session(), "apply_request", {"code": NON_ASCII}, metadata={"targets": [0]},
                           buffers=[PICKLE_42])
    (reply,), _ = run_tool([dict(decode_request(frames, parse_content=parse_content), op="reencode",
                                 metadata={"engine": "e-9"}, header={"msg_type": "apply_reply"})])
    assert reply["ok"], reply
    out = [unb64(f) for f in reply["frames"]]
    assert out[1] != frames[1]  # re-signed
    if not parse_content:
        assert out[5] == frames[5]  # content relayed as the original bytes
    _, msg = py_receive(py_session(), out)
    assert msg["metadata"] == {"targets": [0], "engine": "e-9"}
    assert msg["header"]["msg_type"] == "apply_reply"
    assert msg["header"]["msg_id"] == sent["header"]["msg_id"]
    assert msg["content"] == {"code": NON_ASCII}
    assert [bytes(b) for b in msg["buffers"]] == [PICKLE_42]


# ------------------------------------------------------------------------------------------
# Deliberate divergence


def test_invalid_utf8_that_jupyter_client_tolerates_is_refused_by_cpp():
    """jupyter_client packs str with errors="surrogateescape" and unpacks bytes with
    errors="replace", so a lone escaped surrogate becomes a raw 0xff byte that Python accepts.
    The C++ codec refuses invalid UTF-8 in JSON (Drop::invalid_json) instead of guessing."""
    frames, _ = py_send(py_session(), "stream", {"name": "stdout", "text": "bad \udcff byte"})
    assert b"bad \xff byte" in frames[-1]
    _, msg = py_receive(py_session(), frames)
    assert msg["content"]["text"] == "bad \ufffd byte"
    (reply,), _ = run_tool([decode_request(frames)])
    assert reply["ok"] is False
    assert reply["reason"] == "invalid_json"
    assert "content" in reply["detail"]
