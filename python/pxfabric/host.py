"""The functions pxengine's C++ host (mpi/pyhost.cpp) calls: the Python half of the bridge
between a rank's embedded interpreter and :class:`pxfabric.engine.EngineRuntime`.

JSON goes in and out exactly as jupyter_client packs it, and the calls into the runtime are
made here, so the C++ side only moves bytes. Requests arrive as the raw JSON frames (bytes);
replies leave as ``(msg_type, content JSON, metadata JSON[, buffers])``.

Imported by every rank at start-up, right after :mod:`pxfabric.engine`: standard library only
at the top (tests/python/test_lazy_imports.py); anything heavier is imported where it is used.
"""

import json
import logging
import os


def _json_default(obj):
    from jupyter_client.jsonutil import json_default
    return json_default(obj)


def pack(obj):
    """``obj`` as UTF-8 JSON bytes, as jupyter_client's Session packs it (dates, bytes and
    numpy scalars through ``json_default``; what JSON cannot hold cleaned by ``json_clean``)."""
    try:
        s = json.dumps(obj, default=_json_default, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        from ipykernel.jsonutil import json_clean
        s = json.dumps(json_clean(obj), default=_json_default, ensure_ascii=False)
    return s.encode("utf8", "surrogateescape")


def _loads(b):
    """A metadata or content frame as a dict: {} when empty or not an object."""
    if not b:
        return {}
    v = json.loads(b)
    return v if isinstance(v, dict) else {}


def run_shell(rt, header_b, md_b, content_b, bufs, received):
    """One shell request on the main thread. Returns ``(reply, down)``: reply is None or
    ``(msg_type, content JSON, metadata JSON, [buffers])``; down: the engine is to stop."""
    header = json.loads(header_b)
    md = _loads(md_b)
    content = _loads(content_b)
    r = rt.handle_shell(header.get("msg_type"), header, md, content, bufs, received)
    down = bool(rt.shutdown_requested or rt.exit_requested)
    if r is None:
        return None, down
    t, c, m, b = r
    return (t, pack(c), pack(m), list(b)), down


def run_control(rt, header_b, content_b):
    """One control request. Returns ``(reply, down)``: reply is None or
    ``(msg_type, content JSON, metadata JSON)``; down: a shutdown was requested."""
    header = json.loads(header_b)
    content = _loads(content_b)
    r = rt.handle_control(header.get("msg_type"), header, content)
    down = bool(rt.shutdown_requested)
    if r is None:
        return None, down
    t, c, m = r
    return (t, pack(c), pack(m)), down


def flush(rt):
    """The control thread's periodic output flush (every 0.2 s)."""
    if rt.output_pending:
        rt.flush_output()


def interrupt(rt):
    return rt.interrupt()


def setup_logging(fd, level):
    """Python logging to ``fd`` (the rank's original stderr), line-buffered, one format."""
    stream = os.fdopen(os.dup(fd), "w", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s [pxengine %(process)d] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def setup_stack_dump(sig):
    """The read end of a pipe that faulthandler writes the main thread's stack into on ``sig``.

    The fallback for a main thread that holds the GIL in native code: faulthandler's handler
    writes the stack of the thread it runs on (the main thread: pthread_kill) without the GIL.
    Both ends non-blocking: a dump nobody reads must never block the main thread."""
    import faulthandler
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    faulthandler.register(sig, file=w, all_threads=False, chain=False)
    return r


def where_state(rt, info_b):
    """The answer to ``pxf_where_request`` (JSON bytes), from the watch thread's info."""
    from pxfabric.stuck import where_state
    return pack(where_state(rt, json.loads(info_b)))


def stuck_report(rt, info_b, parent_b):
    """Publishes the stuck-rank report on the rank's stderr (IOPub)."""
    from pxfabric.stuck import publish_report
    publish_report(rt, json.loads(info_b), json.loads(parent_b))


def make_runtime(engine_id, uuid, publish, profile_dir, capture_fds, shell_config=()):
    from pxfabric.engine import EngineRuntime
    return EngineRuntime(engine_id, uuid, publish, profile_dir=profile_dir or None,
                         capture_fds=capture_fds, shell_config=list(shell_config))
