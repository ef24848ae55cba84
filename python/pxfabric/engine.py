"""Engine runtime: executes ipyparallel requests with the semantics of the stock engine.

The stock engine is ``ipyparallel.engine.kernel.IPythonParallelKernel`` (ipyparallel 7.1 on
ipykernel 6.17). This module reproduces what a client can observe of it -- reply content and
metadata, IOPub messages and their order, aborts, ``engine_info`` -- without sockets, threads
or an event loop. The host (``pxengine``'s C++ or ``tests/python/pyengine.py``) owns the wire:
it decodes requests, calls :meth:`EngineRuntime.handle_shell` / :meth:`EngineRuntime.handle_control`,
sends the returned replies, and sends every IOPub message given to its ``publish`` callback.

Deliberate differences from ipyparallel 7.1, following ipyparallel 8.2+: ``engine_info``
carries the real engine id (7.1 sends -1), and a failed apply publishes one IOPub ``error``
(7.1 sends two; the one kept is the one the 7.1 client ends up storing, with ``engine_info``).

Host contract (what ``pxengine`` must do)
-----------------------------------------
* Create the runtime and call :meth:`~EngineRuntime.handle_shell` on the main thread, one
  request at a time. Pass ``received`` (``CLOCK_MONOTONIC`` seconds when the request came off
  the wire) so queued ``execute_request``s are aborted after an error as in the stock engine.
* Pass request buffers as Python-owned, *writable* objects (``bytearray`` or a writable
  ``memoryview``): unpacked numpy arrays are views of them, writable on stock engines.
* Handle ``abort_request``, ``shutdown_request`` and ``signal_request`` with
  :meth:`~EngineRuntime.handle_control` on the fabric thread (GIL held), immediately;
  queue ``clear_request`` for the main thread ahead of pending shell requests.
* ``publish`` is called from the main thread, the fabric thread and user threads: make it
  thread-safe and copy (or keep a reference to) the buffers before returning.
* Every ~0.2 s, if :attr:`~EngineRuntime.output_pending`, call
  :meth:`~EngineRuntime.flush_output` (ipykernel's IOPub thread does the same).
* Interrupt with :meth:`~EngineRuntime.interrupt` (any thread): it sends SIGINT to the main
  thread so blocking calls wake up; ``PyErr_SetInterrupt`` alone does not wake ``sleep``.
* ``handle_shell`` publishes ``status: idle`` before it returns the reply (ipykernel sends the
  reply first; the two travel on different sockets, so clients cannot rely on either order).
* Exit after :attr:`~EngineRuntime.shutdown_requested` or :attr:`~EngineRuntime.exit_requested`
  (user ``exit()``), after sending the last reply; call :meth:`~EngineRuntime.close` first.
* With ``capture_fds=True`` (stock behaviour) C-level output on fds 1/2 is captured: log to
  ``runtime.stdout.fileno()``/``runtime.stderr.fileno()``, the saved original descriptors.
"""

from __future__ import annotations

import atexit
import builtins
import getpass
import glob
import logging
import os
import signal
import sys
import threading
import time
import traceback
import _signal
import _thread
from typing import Any, Dict, Iterable, List, Optional, Tuple

from IPython.core.profiledir import ProfileDir
from IPython.paths import get_ipython_dir
from ipykernel.jsonutil import json_clean
from ipyparallel.error import wrap_exception
from ipyparallel.serialize import serialize_object, unpack_apply_message
from jupyter_client.session import MAX_BYTES, MAX_ITEMS

from .iostream import FdCapture, OutStream
from .jsonsafe import iso_now, jsonable
from .shell import DataPublisher, KernelStub, Publish, make_shell

__all__ = ["EngineRuntime", "ShellReply", "ControlReply", "Publish"]

#: ``(reply_msg_type, reply_content, reply_metadata, reply_buffers)``
ShellReply = Tuple[str, dict, dict, list]
#: ``(reply_msg_type, reply_content, reply_metadata)``
ControlReply = Tuple[str, dict, dict]

log = logging.getLogger("pxfabric.engine")


class EngineRuntime:
    """Executes shell and control requests for one engine, like the stock ipyparallel engine.

    Parameters
    ----------
    engine_id : int
        The id the hub assigned (MPI rank plus offset). Used in IOPub topics
        (``b"engine.<id>.<kind>"``) and in ``engine_info``.
    engine_uuid : str
        The engine's uuid: its ZMQ identity and session id; goes into ``metadata.engine``.
    publish : callable
        ``publish(msg_type, content, parent_header, metadata, buffers, topic)`` sends one IOPub
        message. ``content``/``parent_header``/``metadata`` are JSON-ready dicts, ``buffers`` a
        list of bytes-like objects, ``topic`` bytes. It may be called from any thread (user
        threads printing, :meth:`flush_output`, :meth:`handle_control`), so it must be
        thread-safe, and it must copy or reference the buffers before returning.
    profile_dir : str, optional
        IPython profile directory (created if missing). Default: the ``default`` profile in
        ``$IPYTHONDIR`` (``~/.ipython``), as for a stock engine without ``--profile-dir``.
    user_ns : dict, optional
        Initial user namespace (stock: empty).
    capture_fds : bool
        Also capture OS-level writes to fds 1 and 2 (C extensions, ``os.system``), as the stock
        engine does with ipykernel's ``watchfd``. The host's own logging must then go to the
        original descriptors, available as ``runtime.stdout.fileno()`` / ``stderr.fileno()``.
    install_streams : bool
        Replace ``sys.stdout``, ``sys.stderr`` and ``sys.displayhook`` now (stock behaviour).
        :meth:`install_streams`/:meth:`restore_streams` do it later or undo it.
    run_startup : bool
        Run ``$PYTHONSTARTUP`` and the profile's ``startup/*.py|*.ipy`` files, then
        ``exec_lines`` (as the stock engine's ``IPKernelApp.init_code``).
    exec_lines : iterable of str
        Lines of IPython code to run at start (stock: ``IPKernelApp.exec_lines``).
    buffer_threshold, item_threshold : int
        ``serialize_object`` thresholds for results (stock: jupyter_client's 1024 and 64).
    stop_on_error_timeout : float
        Seconds after an error (or an empty ``abort_request``) during which *received*
        ``execute_request``s are still aborted (ipykernel's ``stop_on_error_timeout``, 0).
    shell_config : iterable of str
        ``--Class.trait=value`` options for the IPython shell, read as traitlets config (the
        stock engine gives its whole config to its shell: ``--InteractiveShell.colors=nocolor``).

    Notes
    -----
    Threads: :meth:`handle_shell` must run on the main thread (it runs user code, and SIGINT
    becomes ``KeyboardInterrupt`` only there). :meth:`handle_control` may run on another
    thread while a shell request executes (``abort``, ``shutdown``, ``signal``); its
    ``clear_request`` waits until the running shell request is done, so hosts should run
    ``clear_request`` on the main thread, ahead of queued shell requests, as the stock engine
    does. :meth:`flush_output` and :meth:`interrupt` may be called from any thread.

    Only one runtime may exist per process (IPython's shell is a singleton).
    """

    def __init__(
        self,
        engine_id: int,
        engine_uuid: str,
        publish: Publish,
        *,
        profile_dir: Optional[str] = None,
        user_ns: Optional[dict] = None,
        capture_fds: bool = False,
        install_streams: bool = True,
        run_startup: bool = True,
        exec_lines: Iterable[str] = (),
        buffer_threshold: int = MAX_BYTES,
        item_threshold: int = MAX_ITEMS,
        stop_on_error_timeout: float = 0.0,
        shell_config: Iterable[str] = (),
    ) -> None:
        self.engine_id = int(engine_id)
        self.engine_uuid = str(engine_uuid)
        self._publish = publish
        self.stop_on_error_timeout = float(stop_on_error_timeout)
        self._thresholds = {"buffer_threshold": buffer_threshold, "item_threshold": item_threshold}

        #: msg_ids named by ``abort_request``; answered ``aborted`` when they arrive.
        self.aborted: set = set()
        #: True once a ``shutdown_request`` was handled; the host should then exit.
        self.shutdown_requested = False
        #: Seconds between a ``signal_request``'s reply and its signal (other than SIGINT):
        #: time for the reply to leave the rank before a fatal signal ends it.
        self.signal_delay = 0.25

        self._engine_md = {"engine": self.engine_uuid}
        base = f"engine.{self.engine_id}."
        self._topics = {
            kind: (base + kind).encode("ascii")
            for kind in ("status", "execute_input", "stdout", "stderr", "error",
                         "execute_result", "displaypub", "shutdown")
        }
        self._abort_until: Optional[float] = None
        self._apply_engine_info: Optional[dict] = None
        self._interruptible = False
        self._exec_lock = threading.RLock()
        self._closed = False

        self.stdout = OutStream("stdout", self._emit_stream, 1)
        self.stderr = OutStream("stderr", self._emit_stream, 2)
        self._captures: List[FdCapture] = []
        self._saved_std: Optional[tuple] = None
        self._saved_main = sys.modules.get("__main__")

        self.kernel = KernelStub(self.engine_id, self.engine_uuid)
        profile = _profile(profile_dir)
        self.shell = make_shell(self.kernel, profile, user_ns, self._publish_traceback,
                                config_args=shell_config)
        self.shell.displayhook.bind(self._publish)
        self.shell.displayhook.topic = self._topics["execute_result"]
        self.shell.display_pub.bind(self._publish, self.engine_uuid)
        self.shell.display_pub.topic = self._topics["displaypub"]
        data_pub = DataPublisher(self._publish, self.engine_uuid, self._thresholds)
        self.shell.data_pub = data_pub
        self.kernel.data_pub = data_pub

        if capture_fds:
            for fd, stream in ((1, self.stdout), (2, self.stderr)):
                _flush_quietly(sys.__stdout__ if fd == 1 else sys.__stderr__)
                cap = FdCapture(fd, stream)
                stream._capture = cap
                stream._fileno = cap.original
                self._captures.append(cap)

        # SIGINT: ignored between requests (like the stock engine), Python's
        # default_int_handler while a request runs (like ipykernel's pre_handler_hook), so a
        # KeyboardInterrupt traceback has no extra frame.
        self._main_ident = threading.main_thread().ident
        self._sigint_handler = self._on_sigint
        #: SIGINT's handler while a request runs. A host may swap in a C function that also
        #: notes that the interrupt reached Python (pxengine: no stuck-rank report then); a
        #: Python function would add a frame to every KeyboardInterrupt traceback.
        self.request_sigint_handler: Any = signal.default_int_handler
        self._saved_sigint: Any = None
        self._manage_sigint = threading.current_thread() is threading.main_thread()
        if self._manage_sigint:
            self._saved_sigint = signal.signal(signal.SIGINT, self._sigint_handler)

        if install_streams:
            self.install_streams()
        if run_startup or exec_lines:
            self._init_code(run_startup, list(exec_lines), profile)

    # ------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------
    def handle_shell(
        self,
        msg_type: str,
        header: dict,
        metadata: Optional[dict],
        content: dict,
        buffers: List[Any],
        received: Optional[float] = None,
    ) -> Optional[ShellReply]:
        """Handle one shell-channel request (``apply_request`` or ``execute_request``).

        Publishes ``status: busy``, the request's outputs, and ``status: idle`` through
        ``publish`` (outputs are flushed before this returns), then returns the reply.

        Parameters
        ----------
        msg_type : str
            ``header["msg_type"]``.
        header : dict
            The request header, copied verbatim into ``parent_header`` of everything sent.
        metadata : dict
            The request metadata (broadcast keys are copied into the reply metadata).
        content : dict
            The request content.
        buffers : list of bytes-like
            The request's buffers (apply payload). They are not copied: objects unpacked
            from them (numpy arrays) keep referencing them, so they must be Python-owned
            buffer objects that keep their memory alive while referenced. Writable ones
            (``bytearray``, writable ``memoryview``) give writable arrays, as on stock
            engines (zmq frames); ``bytes`` give read-only arrays.
        received : float, optional
            ``time.monotonic()`` (``CLOCK_MONOTONIC`` seconds) when the host took the request
            off the wire. Needed to abort ``execute_request``s that were already queued when
            an error (or an empty ``abort_request``) happened; without it none are.

        Returns
        -------
        (reply_msg_type, reply_content, reply_metadata, reply_buffers) or None
            ``None`` when the stock engine sends no reply (unknown type, malformed request).
            ``reply_buffers`` holds ``bytes`` and 1-D byte ``memoryview`` objects.
        """
        md_in = metadata or {}
        msg = {
            "header": header,
            "msg_id": header.get("msg_id"),
            "msg_type": msg_type,
            "parent_header": {},
            "metadata": md_in,
            "content": content,
            "buffers": buffers,
        }
        with self._exec_lock:
            self._set_shell_parent(msg)
            self._status("busy", header)
            if (
                msg_type == "execute_request"
                and received is not None
                and self._abort_until is not None
                and received <= self._abort_until
            ):
                reply = self._abort_reply(msg)
                self._status("idle", header)
                return reply
            msg_id = msg["msg_id"]
            if msg_id in self.aborted:
                self.aborted.discard(msg_id)
                # Like the stock kernel: no idle status after an abort by msg_id.
                return self._abort_reply(msg)

            if msg_type == "apply_request":
                handler = self._apply_request
            elif msg_type == "execute_request":
                handler = self._execute_request
            else:
                handler = None
                log.warning("Unknown message type: %r", msg_type)
            reply = None
            if handler is not None:
                try:
                    reply = handler(msg)
                except (KeyboardInterrupt, Exception) as e:
                    # A KeyboardInterrupt that escaped the handler's own error handling, or
                    # a failure of this module: still answer, so the client never hangs
                    # (ipykernel would log it and send nothing).
                    self._disarm()
                    if not isinstance(e, KeyboardInterrupt):
                        log.error("Exception in message handler:", exc_info=True)
                    reply = self._fallback_reply(msg, e)
                finally:
                    self._disarm()
            self._flush_std()
            self._status("idle", header)
            return reply

    def handle_control(
        self, msg_type: str, header: dict, content: dict
    ) -> Optional[ControlReply]:
        """Handle one control-channel request.

        ``clear_request`` resets the user namespace; ``abort_request`` remembers ``msg_ids``
        (an empty list aborts queued ``execute_request``s, see ``received`` in
        :meth:`handle_shell`); ``shutdown_request`` also publishes ``shutdown_reply`` on IOPub
        and sets :attr:`shutdown_requested`; ``signal_request`` behaves like the stock nanny
        (``SIGINT`` interrupts the running request, other signals go to this process, reply
        type ``"_request"``).

        Returns
        -------
        (reply_msg_type, reply_content, reply_metadata) or None
            ``None`` for unknown types (the stock engine does not reply).
        """
        if msg_type == "signal_request":
            return self._signal_request(content)
        parent = {"header": header, "msg_id": header.get("msg_id"), "msg_type": msg_type,
                  "parent_header": {}, "metadata": {}, "content": content}
        self.kernel.set_parent(None, parent, "control")
        self._status("busy", header)
        reply: Optional[ControlReply] = None
        try:
            if msg_type == "clear_request":
                with self._exec_lock:
                    self.shell.reset(False)
                reply = ("clear_reply", {"status": "ok"}, dict(self._engine_md))
            elif msg_type == "abort_request":
                reply = self._abort_request(content)
            elif msg_type == "shutdown_request":
                reply = self._shutdown_request(header, content)
            else:
                log.error("UNKNOWN CONTROL MESSAGE TYPE: %r", msg_type)
        except Exception:
            log.error("Exception in control handler:", exc_info=True)
        self._flush_std()
        self._status("idle", header)
        return reply

    def flush_output(self) -> None:
        """Publish buffered stdout/stderr now. Safe from any thread (hosts call it periodically
        while a request runs, as ipykernel's IOPub thread flushes every 0.2 s)."""
        self.stdout.flush()
        self.stderr.flush()

    @property
    def output_pending(self) -> bool:
        """True when stdout/stderr hold text not yet published."""
        return self.stdout.pending or self.stderr.pending

    @property
    def busy(self) -> bool:
        """True while a shell request runs user code."""
        return self._interruptible

    @property
    def exit_requested(self) -> bool:
        """True after user code called ``exit()``/``quit()`` (the stock engine then stops)."""
        return bool(self.shell.exit_now)

    def interrupt(self) -> bool:
        """Raise ``KeyboardInterrupt`` in the running request, if any. Any thread.

        Sends ``SIGINT`` to the main thread (so blocking calls such as ``time.sleep`` wake
        up, as with the stock nanny's signal). ``PyErr_SetInterrupt`` from C++ works too, but
        only takes effect when the main thread next runs Python bytecode.

        Returns
        -------
        bool
            Whether a request was running.
        """
        if not self._interruptible:
            return False
        if self._manage_sigint and callable(_signal.getsignal(signal.SIGINT)):
            signal.pthread_kill(self._main_ident, signal.SIGINT)
        else:
            _thread.interrupt_main()
        return True

    def install_streams(self) -> None:
        """Make ``sys.stdout``/``sys.stderr``/``sys.displayhook`` the engine's."""
        if self._saved_std is None:
            self._saved_std = (sys.stdout, sys.stderr, sys.displayhook)
        sys.stdout = self.stdout
        sys.stderr = self.stderr
        sys.displayhook = _sys_displayhook

    def restore_streams(self) -> None:
        """Undo :meth:`install_streams` (flushing first)."""
        self.flush_output()
        if self._saved_std is not None:
            sys.stdout, sys.stderr, sys.displayhook = self._saved_std
            self._saved_std = None

    def close(self) -> None:
        """Flush, restore the process state changed at start, and drop the IPython shell."""
        if self._closed:
            return
        self._closed = True
        try:
            self.restore_streams()
        finally:
            for cap in self._captures:
                cap.close()
            self._captures.clear()
            self.stdout._capture = self.stderr._capture = None
            if self._manage_sigint and self._saved_sigint is not None:
                signal.signal(signal.SIGINT, self._saved_sigint)
            atexit.unregister(self.shell.atexit_operations)
            try:
                self.shell.history_manager.end_session()
            except Exception:
                pass
            type(self.shell).clear_instance()
            if self._saved_main is not None:
                sys.modules["__main__"] = self._saved_main

    # ------------------------------------------------------------------------------------
    # shell requests
    # ------------------------------------------------------------------------------------
    def _apply_request(self, msg: dict) -> Optional[ShellReply]:
        try:
            content = msg["content"]
            bufs = msg["buffers"]
            msg_id = msg["header"]["msg_id"]
        except Exception:
            log.error("Got bad msg: %s", msg, exc_info=True)
            return None
        md = self._init_metadata(msg["metadata"])
        reply_content, result_buf = self._do_apply(content, bufs, msg_id)
        md = self._finish_metadata(md, reply_content)
        return "apply_reply", reply_content, md, result_buf

    def _do_apply(self, content: dict, bufs: list, msg_id: str) -> Tuple[dict, list]:
        # Same steps, names and frame layout as IPythonParallelKernel.do_apply, so
        # tracebacks (which skip this frame) and the temporary names match.
        shell = self.shell
        try:
            self._arm()
            working = shell.user_ns
            prefix = "_" + str(msg_id).replace("-", "") + "_"
            f, args, kwargs = unpack_apply_message(bufs, working, copy=False)
            fname = prefix + "f"
            argname = prefix + "args"
            kwargname = prefix + "kwargs"
            resultname = prefix + "result"
            ns = {fname: f, argname: args, kwargname: kwargs, resultname: None}
            working.update(ns)
            # == compile(f"{resultname} = {fname}(*{argname},**{kwargname})", "<string>", "exec")
            code = _CALL_TEMPLATE.replace(co_names=(fname, argname, kwargname, resultname))
            try:
                exec(code, shell.user_global_ns, shell.user_ns)
                result = working.get(resultname)
            finally:
                for key in ns:
                    working.pop(key, None)
            result_buf = serialize_object(result, **self._thresholds)
            self._disarm()
        except BaseException as e:
            self._disarm()
            self._apply_engine_info = self._engine_info("apply")
            try:
                shell.showtraceback()
            except Exception as tb_error:
                log.error("Failed to show traceback for %r: %s", e, tb_error)
            finally:
                self._apply_engine_info = None
            try:
                str_evalue = str(e)
            except Exception as str_error:
                str_evalue = f"Failed to cast exception to string: {str_error}"
            reply_content = {
                "traceback": getattr(shell, "_last_traceback", None) or [],
                "ename": str(type(e).__name__),
                "evalue": str_evalue,
            }
            shell._last_traceback = None
            reply_content["engine_info"] = self._engine_info("apply")
            log.info("Exception in apply request:\n%s", "\n".join(reply_content["traceback"]))
            reply_content["status"] = "error"
            return jsonable(reply_content), []
        return {"status": "ok"}, _byte_buffers(result_buf)

    def _execute_request(self, msg: dict) -> Optional[ShellReply]:
        try:
            content = msg["content"]
            code = content["code"]
            silent = content["silent"]
            store_history = content.get("store_history", not silent)
            user_expressions = content.get("user_expressions", {})
            allow_stdin = content.get("allow_stdin", False)
        except Exception:
            log.error("Got bad msg: %s", msg)
            return None
        stop_on_error = content.get("stop_on_error", True)
        md = self._init_metadata(msg["metadata"])
        shell = self.shell
        if not silent:
            self._publish(
                "execute_input",
                {"code": code, "execution_count": shell.execution_count},
                msg["header"], dict(self._engine_md), [], self._topics["execute_input"],
            )
        cell_id = (msg.get("metadata") or {}).get("cellId")
        reply_content = self._do_execute(
            code, silent, store_history, user_expressions, allow_stdin, cell_id
        )
        reply_content = jsonable(json_clean(reply_content))
        md = self._finish_metadata(md, reply_content)
        if not silent and reply_content["status"] == "error" and stop_on_error:
            self._abort_queues()
        return "execute_reply", reply_content, md, []

    def _do_execute(self, code, silent, store_history, user_expressions, allow_stdin, cell_id):
        shell = self.shell
        self._forward_input(allow_stdin)
        res = None
        interrupted: Optional[BaseException] = None
        try:
            try:
                self._arm()
                res = shell.run_cell(
                    code, store_history=store_history, silent=silent, cell_id=cell_id
                )
            finally:
                self._disarm()
        except KeyboardInterrupt as e:
            # Escaped IPython's own handling (e.g. arrived outside run_code): report it
            # instead of dropping the reply as ipykernel's dispatch_shell would.
            interrupted = e
            shell.showtraceback()
        finally:
            self._restore_input()

        reply_content: Dict[str, Any] = {}
        if interrupted is not None:
            err: Optional[BaseException] = interrupted
            success = False
        else:
            err = res.error_before_exec if res.error_before_exec is not None else res.error_in_exec
            success = res.success
        if success:
            reply_content["status"] = "ok"
        else:
            reply_content["status"] = "error"
            reply_content.update(
                {
                    "traceback": shell._last_traceback or [],
                    "ename": str(type(err).__name__),
                    "evalue": _safe_str(err),
                }
            )
            reply_content["engine_info"] = self._engine_info("execute")
        reply_content["execution_count"] = shell.execution_count - 1
        if "traceback" in reply_content:
            log.info("Exception in execute request:\n%s", "\n".join(reply_content["traceback"]))
        if reply_content["status"] == "ok":
            reply_content["user_expressions"] = shell.user_expressions(user_expressions or {})
        else:
            reply_content["user_expressions"] = {}
        reply_content["payload"] = shell.payload_manager.read_payload()
        shell.payload_manager.clear_payload()
        return reply_content

    def _fallback_reply(self, msg: dict, exc: BaseException) -> ShellReply:
        """Error reply for an exception that escaped a handler's own error handling."""
        msg_type = msg["msg_type"]
        method = "apply" if msg_type == "apply_request" else "execute"
        reply_content = jsonable({
            "status": "error",
            "ename": type(exc).__name__,
            "evalue": _safe_str(exc),
            "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__),
            "engine_info": self._engine_info(method),
        })
        if method == "execute":
            reply_content.update(
                execution_count=self.shell.execution_count - 1, user_expressions={}, payload=[]
            )
        md = self._finish_metadata(self._init_metadata(msg["metadata"]), reply_content)
        return msg_type.rsplit("_", 1)[0] + "_reply", reply_content, md, []

    def _abort_reply(self, msg: dict) -> ShellReply:
        log.info("Aborting %s: %s", msg["msg_id"], msg["msg_type"])
        reply_type = msg["msg_type"].rsplit("_", 1)[0] + "_reply"
        status = {"status": "aborted"}
        md = self._finish_metadata(self._init_metadata(msg["metadata"]), status)
        md.update(status)
        return reply_type, dict(status), md, []

    # ------------------------------------------------------------------------------------
    # control requests
    # ------------------------------------------------------------------------------------
    def _abort_request(self, content: dict) -> ControlReply:
        msg_ids = content.get("msg_ids", None)
        if isinstance(msg_ids, str):
            msg_ids = [msg_ids]
        if not msg_ids:
            self._abort_queues()
        for mid in msg_ids or ():
            self.aborted.add(str(mid))
        return "abort_reply", {"status": "ok"}, dict(self._engine_md)

    def _shutdown_request(self, header: dict, content: dict) -> ControlReply:
        restart = content.get("restart", False)
        self.shell.exit_now = True
        reply_content = {"status": "ok", "restart": restart}
        # ipykernel sends the same content again on IOPub, as a message built whole.
        self._publish("shutdown_reply", dict(reply_content), header, {}, [], self._topics["shutdown"])
        self.shutdown_requested = True
        return "shutdown_reply", reply_content, dict(self._engine_md)

    def _signal_request(self, content: dict) -> ControlReply:
        try:
            sig = content["sig"]
            if isinstance(sig, str):
                sig = getattr(signal, sig)
            sig = int(sig)
            if sig == signal.SIGINT:
                self.interrupt()
            else:
                signal.Signals(sig)  # ValueError for a number that is no signal, as os.kill
                # Reply first, then signal: a fatal signal (SIGKILL, SIGTERM) would end the rank
                # before its signal_reply left, and the client waits for that reply with no
                # timeout (stock's nanny signals the kernel from another process, then replies).
                timer = threading.Timer(self.signal_delay, os.kill, (os.getpid(), sig))
                timer.daemon = True
                timer.start()
            reply_content = {"status": "ok"}
        except Exception:
            log.error("Error handling request: signal_request", exc_info=True)
            reply_content = jsonable(wrap_exception())
        return "_request", reply_content, {}

    def _abort_queues(self) -> None:
        self._abort_until = time.monotonic() + self.stop_on_error_timeout

    # ------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------
    def _init_metadata(self, req_md: dict) -> dict:
        return {
            "started": iso_now(),
            "dependencies_met": True,
            "engine": self.engine_uuid,
            "is_broadcast": req_md.get("is_broadcast", False),
            "is_coalescing": req_md.get("is_coalescing", False),
            "original_msg_id": req_md.get("original_msg_id", ""),
        }

    def _finish_metadata(self, md: dict, reply_content: dict) -> dict:
        md["status"] = reply_content["status"]
        if reply_content["status"] == "error":
            if reply_content["ename"] == "UnmetDependency":
                md["dependencies_met"] = False
            md["engine_info"] = {"engine_uuid": self.engine_uuid, "engine_id": self.engine_id}
        return md

    def _engine_info(self, method: str) -> dict:
        return {"engine_uuid": self.engine_uuid, "engine_id": self.engine_id, "method": method}

    def _status(self, state: str, parent: dict) -> None:
        self._publish(
            "status", {"execution_state": state}, parent, dict(self._engine_md), [],
            self._topics["status"],
        )

    def _set_shell_parent(self, msg: dict) -> None:
        self.kernel._parents["shell"] = msg
        self.shell.set_parent(msg)

    def _emit_stream(self, name: str, text: str, parent: dict) -> None:
        self._publish(
            "stream", {"name": name, "text": text}, parent, dict(self._engine_md), [],
            self._topics[name],
        )

    def _publish_traceback(self, ename: str, evalue: str, stb: List[str]) -> None:
        """IOPub ``error`` as ipykernel's ``ZMQInteractiveShell._showtraceback`` sends it."""
        content: Dict[str, Any] = {"traceback": stb, "ename": ename, "evalue": evalue}
        if self._apply_engine_info is not None:
            content["engine_info"] = dict(self._apply_engine_info)
        parent = getattr(self.shell.displayhook, "_parent", {}) or {}
        self._publish(
            "error", jsonable(content), parent, dict(self._engine_md), [], self._topics["error"]
        )

    def _flush_std(self) -> None:
        # ipykernel flushes whatever sys.stdout/sys.stderr are; ours always.
        self.stdout.flush()
        self.stderr.flush()
        for stream in (sys.stdout, sys.stderr):
            if stream is not self.stdout and stream is not self.stderr:
                _flush_quietly(stream)

    def _on_sigint(self, signum, frame) -> None:
        log.warning("Ignoring SIGINT: no request is running.")

    def _arm(self) -> None:
        """User code starts: SIGINT raises KeyboardInterrupt."""
        self._interruptible = True
        if self._manage_sigint:
            _signal.signal(signal.SIGINT, self.request_sigint_handler)

    def _disarm(self) -> None:
        """User code is done: SIGINT is ignored again (also undoes a handler set by user code)."""
        if self._manage_sigint:
            _signal.signal(signal.SIGINT, self._sigint_handler)
        self._interruptible = False

    def _forward_input(self, allow_stdin: bool) -> None:
        # There is no stdin channel, so input requests always fail (allow_stdin is ignored;
        # ipyparallel never sets it).
        self._sys_raw_input = builtins.input
        builtins.input = self.kernel.raw_input
        self._save_getpass = getpass.getpass
        getpass.getpass = self.kernel.getpass

    def _restore_input(self) -> None:
        builtins.input = self._sys_raw_input
        getpass.getpass = self._save_getpass

    def _init_code(self, run_startup: bool, exec_lines: List[str], profile: ProfileDir) -> None:
        shell = self.shell
        if run_startup:
            files = []
            startup = os.environ.get("PYTHONSTARTUP")
            if startup:
                files.append(startup)
            found = glob.glob(os.path.join(profile.startup_dir, "*.py"))
            found += glob.glob(os.path.join(profile.startup_dir, "*.ipy"))
            files += sorted(found)
            for fname in files:
                try:
                    if fname.endswith(".ipy"):
                        shell.safe_execfile_ipy(fname)
                    else:
                        shell.safe_execfile(fname, shell.user_ns)
                except Exception:
                    log.warning("Unknown error in handling startup file %s", fname, exc_info=True)
        for line in exec_lines:
            try:
                shell.run_cell(line, store_history=False)
            except Exception:
                log.warning("Error in executing line in user namespace: %s", line, exc_info=True)
        shell.user_ns_hidden.update(shell.user_ns)
        self.flush_output()
        shell._sys_modules_keys = set(sys.modules.keys())


# Placeholders in order of first use, as in the stock engine's call statement.
_CALL_TEMPLATE = compile("R = F(*A,**K)", "<string>", "exec", dont_inherit=True)
assert _CALL_TEMPLATE.co_names == ("F", "A", "K", "R")


def _sys_displayhook(obj: Any) -> None:
    """``sys.displayhook`` outside cells: the stock one publishes with an empty parent
    (which clients and the hub discard), so only its side effect on ``_`` remains."""
    if obj is None:
        return
    builtins._ = obj  # type: ignore[attr-defined]


def _byte_buffers(buffers: list) -> list:
    """Result frames as ``bytes`` or flat, contiguous byte memoryviews (zero-copy if possible)."""
    out = []
    for buf in buffers:
        if isinstance(buf, bytes):
            out.append(buf)
            continue
        view = memoryview(buf)
        if view.ndim == 1 and view.format == "B" and view.c_contiguous:
            out.append(view)
            continue
        try:
            out.append(view.cast("B"))
        except (TypeError, ValueError):  # non-contiguous or a non-native format (struct dtypes)
            out.append(view.tobytes())
    return out


def _safe_str(obj: Any) -> str:
    try:
        return str(obj)
    except Exception as e:  # a broken __str__ must not lose the reply
        return f"Failed to cast exception to string: {e}"


def _flush_quietly(stream: Any) -> None:
    try:
        stream.flush()
    except Exception:
        pass


def _profile(profile_dir: Optional[str]) -> ProfileDir:
    if profile_dir:
        return ProfileDir.create_profile_dir(os.path.abspath(os.path.expanduser(profile_dir)))
    return ProfileDir.create_profile_dir_by_name(get_ipython_dir(), "default")
