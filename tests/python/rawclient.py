"""A minimal raw ipyparallel client that records exactly what an engine puts on the wire.

Used to compare a pyengine (``EngineRuntime``) with a stock engine message by message.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import zmq
import ipyparallel.client.client  # noqa: F401  (same date handling as the stock client)
from ipyparallel.serialize import deserialize_object, pack_apply_message
from jupyter_client.session import Session


class Exchange:
    """Everything that came back for one request: the reply and the IOPub messages."""

    def __init__(self) -> None:
        self.reply: Optional[dict] = None
        self.iopub: List[dict] = []

    @property
    def result(self) -> Any:
        return deserialize_object(self.reply["buffers"])[0]


class RawClient:
    """Sends requests to one engine (by uuid) through the controller and collects the answers."""

    def __init__(self, client_file: Path) -> None:
        info = json.loads(Path(client_file).read_text())
        self.session = Session(key=info["key"].encode(), signature_scheme=info["signature_scheme"])
        self.ctx = zmq.Context()

        def url(key):
            return f"{info['interface']}:{info[key]}"

        self.mux = self.ctx.socket(zmq.DEALER)
        self.mux.connect(url("mux"))
        self.control = self.ctx.socket(zmq.DEALER)
        self.control.connect(url("control"))
        self.iopub = self.ctx.socket(zmq.SUB)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(url("iopub"))
        self.query = self.ctx.socket(zmq.DEALER)
        self.query.connect(url("registration"))
        self._stash: List[Tuple[zmq.Socket, dict]] = []  # received, not yet collected
        time.sleep(0.3)  # let the SUB subscription reach the controller

    def engines(self) -> Dict[int, str]:
        self.session.send(self.query, "connection_request", {})
        if not self.query.poll(10000):
            raise TimeoutError("no connection_reply")
        msg = self._recv(self.query)
        return {int(k): v for k, v in msg["content"]["engines"].items()}

    def close(self) -> None:
        for sock in (self.mux, self.control, self.iopub, self.query):
            sock.close(linger=0)
        self.ctx.term()

    # -- requests ---------------------------------------------------------------------------
    def apply(self, uuid: str, f, *args, metadata: Optional[dict] = None, **kwargs) -> Exchange:
        bufs = pack_apply_message(f, args, kwargs)
        return self.request(uuid, "apply_request", {}, bufs, metadata)

    def execute(self, uuid: str, code: str, silent: bool = False,
                metadata: Optional[dict] = None) -> Exchange:
        content = {"code": code, "silent": silent, "user_expressions": {}}
        return self.request(uuid, "execute_request", content, [], metadata)

    def request(self, uuid: str, msg_type: str, content: dict, buffers: list,
                metadata: Optional[dict] = None, timeout: float = 20.0) -> Exchange:
        msg = self.session.send(self.mux, msg_type, content, ident=uuid.encode(),
                                buffers=buffers, metadata=metadata or {})
        return self.collect(self.mux, msg["header"]["msg_id"], timeout)

    def send(self, uuid: str, msg_type: str, content: dict, buffers: list = (),
             metadata: Optional[dict] = None) -> str:
        """Send without waiting; returns the msg_id (collect later with :meth:`collect`)."""
        msg = self.session.send(self.mux, msg_type, content, ident=uuid.encode(),
                                buffers=list(buffers), metadata=metadata or {})
        return msg["header"]["msg_id"]

    def control_request(self, uuid: str, msg_type: str, content: dict,
                        timeout: float = 20.0, expect_idle: bool = True) -> Exchange:
        msg = self.session.send(self.control, msg_type, content, ident=uuid.encode())
        return self.collect(self.control, msg["header"]["msg_id"], timeout, expect_idle)

    def collect(self, sock: zmq.Socket, msg_id: str, timeout: float = 20.0,
                expect_idle: bool = True, settle: float = 0.3) -> Exchange:
        """Wait for the reply to ``msg_id`` and its IOPub messages up to ``status: idle``.

        Without ``expect_idle`` (aborted requests publish no idle) it waits ``settle``
        seconds after the reply for stray IOPub messages.
        """
        ex = Exchange()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.iopub, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        idle = False
        settle_until = None
        stashed, self._stash = self._stash, []
        while True:
            now = time.monotonic()
            if ex.reply is not None and (idle or (settle_until and now > settle_until)):
                return ex
            if now > deadline:
                raise TimeoutError(f"no complete answer to {msg_id}: reply={ex.reply!r} "
                                   f"iopub={[m['msg_type'] for m in ex.iopub]}")
            if stashed:
                arrived = stashed
                stashed = []
            else:
                arrived = [(s, self._recv(s)) for s, _ in poller.poll(50)]
            for s, msg in arrived:
                if msg["parent_header"].get("msg_id") != msg_id or s not in (sock, self.iopub):
                    self._stash.append((s, msg))
                    continue
                if s is self.iopub:
                    ex.iopub.append(msg)
                    if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                        idle = True
                else:
                    ex.reply = msg
                    if not expect_idle:
                        settle_until = time.monotonic() + settle

    def _recv(self, sock: zmq.Socket) -> dict:
        frames = sock.recv_multipart()
        idents, frames = self.session.feed_identities(frames)
        msg = self.session.deserialize(frames)
        msg["idents"] = idents
        return msg


def normalize(ex: Exchange, uuid: str, engine_id: int) -> Tuple[Optional[tuple], List[tuple]]:
    """Reply and IOPub messages with engine identity and timestamps replaced by placeholders.

    The two documented, deliberate differences from ipyparallel 7.1 are folded: 7.1 sends a
    second IOPub ``error`` for a failed apply (only the last one is kept) and reports
    ``engine_id: -1`` in content ``engine_info``.
    """

    def scrub(obj):
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if k == "started":
                    out[k] = "<DATE>"
                elif k == "engine_id":
                    out[k] = "<ID>"
                else:
                    out[k] = scrub(v)
            return out
        if isinstance(obj, list):
            return [scrub(v) for v in obj]
        if isinstance(obj, str):
            return obj.replace(uuid, "<UUID>")
        if isinstance(obj, bytes):
            return obj.replace(uuid.encode(), b"<UUID>").replace(
                f"engine.{engine_id}.".encode(), b"engine.<ID>."
            )
        return obj

    def flat(msg):
        return (
            scrub(msg["idents"]), msg["msg_type"], scrub(msg["content"]), scrub(msg["metadata"]),
            len(msg.get("buffers") or []),
        )

    iopub = [flat(m) for m in ex.iopub]
    # 7.1 publishes the apply traceback twice; the last copy (with engine_info) is the one kept.
    folded = []
    for i, m in enumerate(iopub):
        if (m[1] == "error" and "engine_info" not in m[2] and i + 1 < len(iopub)
                and iopub[i + 1][1] == "error" and iopub[i + 1][2].get("engine_info")):
            continue
        folded.append(m)
    reply = flat(ex.reply) if ex.reply is not None else None
    return reply, folded
