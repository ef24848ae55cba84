"""Queries to a running controller's registration socket (the hub): which engines are
registered, where they run, and pxcontroller's own counters (``pxf_stats_request``).

Used by pxcluster and, for the stats, by the test and benchmark harnesses."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, List, Optional

from pxfabric import hostfile as hostmod

from .messages import ClusterError
from .state import _read_json

QUERY_TIMEOUT = 2.0         # seconds for one hub query (list, readiness probes)


@contextlib.contextmanager
def hub_connection(client_file: Path):
    """``(session, socket)``: a DEALER connected to the controller's registration socket of a
    client connection file (Curve-aware, ``*`` dialled as 127.0.0.1), or ``None`` when the file
    is missing or incomplete. Closed on exit."""
    info = _read_json(Path(client_file))
    if not info or "registration" not in info:
        yield None
        return
    import zmq
    from jupyter_client.session import Session

    session = Session(key=info.get("key", "").encode(),
                      signature_scheme=info.get("signature_scheme", "hmac-sha256"))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        if info.get("curve_serverkey"):  # --curve: the controller's key and a keypair of ours
            sock.curve_serverkey = info["curve_serverkey"].encode()
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        interface = info["interface"]
        if interface.endswith("://*") or interface.endswith("://0.0.0.0"):
            interface = interface.rsplit("://", 1)[0] + "://127.0.0.1"
        sock.connect(f"{interface}:{info['registration']}")
        yield session, sock
    finally:
        sock.close()
        ctx.term()


def request(client_file: Path, msg_type: str, content: Optional[dict] = None,
            timeout: float = QUERY_TIMEOUT) -> Optional[dict]:
    """One signed request to the controller's registration socket: the reply, or None when
    none came within ``timeout``. A missing or incomplete connection file raises
    :class:`ClusterError`; a reply that does not verify raises too."""
    with hub_connection(client_file) as conn:
        if conn is None:
            raise ClusterError(f"no complete client connection file at {client_file}")
        session, sock = conn
        session.send(sock, msg_type, content or {})
        if not sock.poll(int(timeout * 1000)):
            return None
        _, frames = session.feed_identities(sock.recv_multipart())
        return session.deserialize(frames)


def query_hub(client_file: Path, msg_type: str = "connection_request",
              content: Optional[dict] = None, timeout: float = QUERY_TIMEOUT) -> Optional[dict]:
    """:func:`request`, with every failure as None (for probes: is it up, who is there)."""
    try:
        return request(client_file, msg_type, content, timeout)
    except Exception:
        return None


def controller_stats(client_file: Path, timeout: float = 5.0,
                     content: Optional[dict] = None) -> Optional[dict]:
    """pxcontroller's own counters (``pxf_stats_request``: records, bytes, waiting, in flight,
    drops ...): the reply's content, or None if it did not answer within ``timeout``.
    ``content={"trim": True}`` also trims its heap first. Errors raise, as :func:`request`."""
    reply = request(client_file, "pxf_stats_request", content, timeout)
    return None if reply is None else reply["content"]


def registered_engines(client_file: Path, timeout: float = QUERY_TIMEOUT) -> Optional[Dict[int, str]]:
    """``{engine id: uuid}`` of the engines registered, or None if the hub did not answer."""
    reply = query_hub(client_file, "connection_request", {}, timeout)
    if not reply or reply.get("content", {}).get("status") != "ok":
        return None
    engines = reply["content"].get("engines") or {}
    return {int(k): v for k, v in engines.items()}


def engine_hosts(client_file: Path, timeout: float = QUERY_TIMEOUT) -> Optional[List[dict]]:
    """Where the registered engines run (``pxf_engines_request``), grouped by host:
    ``[{"host": "nodeA", "engines": [0, 1], "ranks": [0, 1]}, ...]``, or None if the hub did
    not answer."""
    reply = query_hub(client_file, "pxf_engines_request", {}, timeout)
    if not reply or reply.get("content", {}).get("status") != "ok":
        return None
    return hostmod.group_hosts(reply["content"].get("engines") or {})
