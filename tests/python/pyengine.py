"""A small pure-Python ipyparallel engine built on ``pxfabric.engine.EngineRuntime``.

It registers with a stock (or pxfabric) controller exactly like the stock engine (protocol
§5.8) and uses the runtime for every request, so the runtime can be validated against the
stock client before the C++ ``pxengine`` exists. Its threading mirrors ``pxengine``: an I/O
thread owns every socket (heartbeat echo, control requests, IOPub, replies) and the main thread
only runs requests.

Usage::

    /usr/bin/python3 tests/python/pyengine.py --file PROFILE/security/ipcontroller-engine.json \
        [--id N] [--uuid UUID] [--profile-dir DIR] [--no-capture-fds] [--log-level 20]

Exit codes: 0 after ``shutdown_request``/SIGTERM/``exit()``, 255 when registration fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Deque, Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))

import zmq  # noqa: E402
import ipyparallel.client.client  # noqa: E402,F401  (disables jupyter_client date parsing, as in stock engines)
from jupyter_client.session import Session, new_id  # noqa: E402

from pxfabric.engine import EngineRuntime  # noqa: E402

log = logging.getLogger("pyengine")


class WorkQueue:
    """Work for the main thread; control items jump ahead of queued shell requests."""

    def __init__(self) -> None:
        self._items: Deque[tuple] = collections.deque()
        self._cond = threading.Condition()

    def put(self, item: tuple, front: bool = False) -> None:
        with self._cond:
            if front:
                self._items.appendleft(item)
            else:
                self._items.append(item)
            self._cond.notify()

    def get(self, timeout: float) -> Optional[tuple]:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None


class IOThread(threading.Thread):
    """Owns all sockets: receives requests, echoes heartbeats, sends replies and IOPub."""

    def __init__(self, engine: "PyEngine") -> None:
        super().__init__(name="pyengine-io", daemon=True)
        self.engine = engine
        self.outgoing: Deque[tuple] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.stopped = threading.Event()
        self.last_ping = time.monotonic()

    def post(self, item: tuple) -> None:
        """Queue an outgoing message (any thread)."""
        self.outgoing.append(item)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.critical("I/O thread failed", exc_info=True)
            self.engine.work.put(("exit",), front=True)
        finally:
            self.stopped.set()

    def _run(self) -> None:
        eng = self.engine
        ctx = eng.ctx
        info = eng.info
        ident = eng.uuid.encode("ascii")

        def url(port: int) -> str:
            return f"{info['interface']}:{port}"

        shell = ctx.socket(zmq.ROUTER)
        shell.setsockopt(zmq.IDENTITY, ident)
        broadcast = info["broadcast"]
        if not isinstance(broadcast, list):
            broadcast = [broadcast]
        for port in (info["mux"], info["task"], broadcast[eng.id % len(broadcast)]):
            shell.connect(url(port))
        control = ctx.socket(zmq.ROUTER)
        control.setsockopt(zmq.IDENTITY, ident)
        control.connect(url(info["control"]))
        iopub = ctx.socket(zmq.PUB)
        iopub.setsockopt(zmq.SNDHWM, 0)
        iopub.setsockopt(zmq.IDENTITY, ident)
        iopub.connect(url(info["iopub"]))
        hb_in = ctx.socket(zmq.SUB)
        hb_in.setsockopt(zmq.SUBSCRIBE, b"")
        hb_in.connect(url(info["hb_ping"]))
        hb_out = ctx.socket(zmq.DEALER)
        hb_out.setsockopt(zmq.IDENTITY, ident)
        hb_out.connect(url(info["hb_pong"]))
        self.sockets = {"shell": shell, "control": control}

        poller = zmq.Poller()
        for sock in (shell, control, hb_in):
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)

        session = eng.session
        watchdog = eng.max_heartbeat_misses * (eng.hb_period + 500) / 1000.0
        stopping = False
        while True:
            events = dict(poller.poll(100))
            now = time.monotonic()
            if hb_in in events:
                while True:
                    try:
                        frames = hb_in.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    hb_out.send_multipart(frames)
                    self.last_ping = now
            if shell in events:
                while True:
                    try:
                        frames = shell.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_shell(frames, time.monotonic())
            if control in events:
                while True:
                    try:
                        frames = control.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_control(frames)
            if self._wake_r in events:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            # ipykernel's IOPub thread flushes buffered output every 0.2 s, busy or not.
            if eng.runtime is not None and eng.runtime.output_pending:
                eng.runtime.flush_output()
            while self.outgoing:
                item = self.outgoing.popleft()
                if item[0] == "stop":
                    stopping = True
                    continue
                self._send(session, iopub, item)
            if stopping and not self.outgoing:
                break
            if watchdog > 0 and now - self.last_ping > watchdog:
                log.critical("no heartbeat from the controller for %.1fs, stopping", watchdog)
                eng.work.put(("exit",), front=True)
                self.last_ping = now
        for sock in (shell, control, iopub, hb_in, hb_out):
            sock.close(linger=1000)

    def _send(self, session: Session, iopub: zmq.Socket, item: tuple) -> None:
        kind = item[0]
        if kind == "iopub":
            _, msg_type, content, parent, metadata, buffers, topic = item
            session.send(iopub, msg_type, content, parent=parent, ident=topic,
                         buffers=buffers, metadata=metadata)
        elif kind == "reply":
            _, channel, idents, parent, (msg_type, content, metadata, buffers) = item
            session.send(self.sockets[channel], msg_type, content, parent=parent, ident=idents,
                         buffers=buffers, metadata=metadata)

    def _decode(self, frames):
        session = self.engine.session
        idents, msg_frames = session.feed_identities(frames, copy=False)
        return idents, session.deserialize(msg_frames, content=True, copy=False)

    def _on_shell(self, frames, received: float) -> None:
        try:
            idents, msg = self._decode(frames)
        except Exception:
            log.error("Invalid shell message dropped", exc_info=True)
            return
        self.engine.work.put(("shell", idents, msg, received))

    def _on_control(self, frames) -> None:
        try:
            idents, msg = self._decode(frames)
        except Exception:
            log.error("Invalid control message dropped", exc_info=True)
            return
        msg_type = msg["header"]["msg_type"]
        if msg_type == "clear_request":
            # Touches the user namespace: run on the main thread, ahead of queued requests.
            self.engine.work.put(("control", idents, msg), front=True)
            return
        reply = self.engine.runtime.handle_control(msg_type, msg["header"], msg["content"])
        if reply is not None:
            self.post(("reply", "control", idents, msg["header"], (*reply, [])))
        if self.engine.runtime.shutdown_requested:
            self.engine.work.put(("exit",), front=True)


class PyEngine:
    """Registration, the main-thread request loop and shutdown."""

    def __init__(self, args: argparse.Namespace) -> None:
        with open(args.file) as f:
            self.info = json.load(f)
        if self.info.get("pack", "json") != "json":
            raise SystemExit("pyengine supports the json packer only")
        self.uuid = args.uuid or new_id()
        self.session = Session(
            key=self.info["key"].encode("ascii"),
            signature_scheme=self.info.get("signature_scheme", "hmac-sha256"),
            session=self.uuid,
        )
        self.ctx = zmq.Context()
        self.requested_id = args.id
        self.profile_dir = args.profile_dir
        self.capture_fds = args.capture_fds
        self.max_heartbeat_misses = args.max_heartbeat_misses
        self.work = WorkQueue()
        self.runtime: Optional[EngineRuntime] = None
        self.id = -1
        self.hb_period = 3000
        self.io: Optional[IOThread] = None
        self.registrar: Optional[zmq.Socket] = None

    def register(self, timeout: float) -> bool:
        reg = self.ctx.socket(zmq.DEALER)
        reg.setsockopt(zmq.IDENTITY, self.uuid.encode("ascii"))
        reg.connect(f"{self.info['interface']}:{self.info['registration']}")
        self.registrar = reg
        content: dict = {"uuid": self.uuid}
        if self.requested_id is not None:
            content["id"] = self.requested_id
        self.session.send(reg, "registration_request", content)
        if not reg.poll(int(timeout * 1000)):
            log.critical("registration timed out after %.1fs", timeout)
            self.session.send(reg, "unregistration_request", {"id": self.requested_id})
            return False
        _, frames = self.session.feed_identities(reg.recv_multipart())
        reply = self.session.deserialize(frames)["content"]
        if reply.get("status") != "ok":
            log.critical("registration failed: %s", reply)
            return False
        self.id = int(reply["id"])
        self.hb_period = int(reply.get("hb_period", 3000))
        return True

    def publish(self, msg_type, content, parent, metadata, buffers, topic) -> None:
        self.io.post(("iopub", msg_type, content, parent, metadata, _owned(buffers), topic))

    def run(self) -> int:
        if not self.register(timeout=10.0):
            return 255
        self.runtime = EngineRuntime(
            self.id, self.uuid, self.publish,
            profile_dir=self.profile_dir, capture_fds=self.capture_fds,
        )
        _log_to_fd(self.runtime.stderr.fileno())
        self.io = IOThread(self)
        self.io.start()
        log.info("registered as engine %d (uuid %s)", self.id, self.uuid)

        signal.signal(signal.SIGTERM, lambda *_: self.work.put(("exit",), front=True))
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _loop(self) -> None:
        rt = self.runtime
        while True:
            item = self.work.get(timeout=0.5)
            if item is None:
                continue
            kind = item[0]
            if kind == "exit":
                return
            if kind == "shell":
                _, idents, msg, received = item
                h = msg["header"]
                reply = rt.handle_shell(h["msg_type"], h, msg["metadata"], msg["content"],
                                        msg["buffers"], received)
                if reply is not None:
                    msg_type, content, metadata, buffers = reply
                    self.io.post(("reply", "shell", idents, h,
                                  (msg_type, content, metadata, _owned(buffers))))
                if rt.exit_requested:
                    return
            elif kind == "control":
                _, idents, msg = item
                h = msg["header"]
                reply = rt.handle_control(h["msg_type"], h, msg["content"])
                if reply is not None:
                    self.io.post(("reply", "control", idents, h, (*reply, [])))

    def _shutdown(self) -> None:
        if self.runtime is not None:
            self.runtime.flush_output()
        if self.io is not None and self.io.is_alive():
            self.io.post(("stop",))
            self.io.stopped.wait(5)
        if self.registrar is not None:
            self.session.send(self.registrar, "unregistration_request", {"id": self.id})
            self.registrar.close(linger=1000)
        if self.runtime is not None:
            self.runtime.close()
        self.ctx.term()


def _owned(buffers) -> list:
    """Copy buffers so the main thread may go on mutating what they view."""
    return [b if isinstance(b, bytes) else bytes(b) for b in buffers]


def _log_to_fd(fd: int) -> None:
    handler = logging.StreamHandler(os.fdopen(os.dup(fd), "w", buffering=1))
    handler.setFormatter(logging.Formatter("%(asctime)s pyengine[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", required=True, help="ipcontroller-engine.json")
    parser.add_argument("--id", type=int, default=None, help="requested engine id")
    parser.add_argument("--uuid", default=None, help="engine uuid (default: random)")
    parser.add_argument("--profile-dir", default=None)
    parser.add_argument("--no-capture-fds", dest="capture_fds", action="store_false")
    parser.add_argument("--max-heartbeat-misses", type=int, default=50)
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s pyengine[%(process)d] %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(args.log_level)
    return PyEngine(args).run()


if __name__ == "__main__":
    sys.exit(main())
