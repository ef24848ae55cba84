"""The IPython shell of an engine: ipykernel's ``ZMQInteractiveShell`` without sockets.

The stock engine runs user code in ipykernel's ``ZMQInteractiveShell`` (magics, ``display``,
``get_ipython()``, ``!cmd`` through pipes, ``Out`` numbering). We instantiate that same class and
only swap what talks to ZeroMQ: the display hook (``execute_result``), the display publisher
(``display_data``/``clear_output``), the data publisher (``data_message``) and the traceback
side channel (``error``). They call the runtime's ``publish`` callback with the content,
metadata and topic the stock engine would send.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from typing import Any, Callable, Dict, Iterable, List, Optional

from IPython.core.interactiveshell import InteractiveShell
from ipykernel.compiler import XCachingCompiler
from ipykernel.displayhook import ZMQShellDisplayHook
from ipykernel.jsonutil import encode_images, json_clean
from ipykernel.kernelbase import Kernel as IPKernel
from ipykernel.zmqshell import ZMQDisplayPublisher, ZMQInteractiveShell
from ipyparallel.serialize import serialize_object
from traitlets.config import Config

from .iostream import _header_of
from .jsonsafe import jsonable

#: ``publish(msg_type, content, parent_header, metadata, buffers, topic)``
Publish = Callable[[str, dict, dict, dict, list, bytes], None]


def _flush_std() -> None:
    sys.stdout.flush()
    sys.stderr.flush()


class DisplayHook(ZMQShellDisplayHook):
    """``execute_result`` publisher (ipykernel's ``ZMQShellDisplayHook`` without a session).

    Like the stock hook, the message is built whole, so its metadata is ``{}``.
    """

    def bind(self, publish: Publish) -> None:
        self._pub = publish
        self._parent: dict = {}

    def set_parent(self, parent: dict) -> None:
        self._parent = _header_of(parent)

    def start_displayhook(self) -> None:
        self.msg = {"content": {"data": {}, "metadata": {}}}

    def finish_displayhook(self) -> None:
        _flush_std()
        content = self.msg["content"]
        if content["data"]:
            self._pub("execute_result", jsonable(content), self._parent, {}, [], self.topic)
        self.msg = None


class DisplayPublisher(ZMQDisplayPublisher):
    """``display_data`` publisher (ipykernel's ``ZMQDisplayPublisher`` without a session).

    Transform hooks registered with :meth:`register_hook` (ipywidgets' ``Output``) still see a
    message dict with ``header``, ``msg_type``, ``parent_header``, ``metadata`` and ``content``.
    As in the stock engine, ``display_data`` is built whole (metadata ``{}``) while
    ``clear_output`` is sent by type (metadata ``{"engine": uuid}``).
    """

    def bind(self, publish: Publish, engine_uuid: str) -> None:
        self._pub = publish
        self._engine_md = {"engine": engine_uuid}
        self._parent: dict = {}

    def set_parent(self, parent: dict) -> None:
        self._parent = _header_of(parent)

    def _message(self, msg_type: str, content: dict, metadata: dict) -> dict:
        return {
            "header": {"msg_type": msg_type},
            "msg_type": msg_type,
            "parent_header": self._parent,
            "metadata": metadata,
            "content": content,
            "buffers": [],
        }

    def publish(self, data, metadata=None, transient=None, update=False):
        self._flush_streams()
        if metadata is None:
            metadata = {}
        if transient is None:
            transient = {}
        self._validate_data(data, metadata)
        content = {"data": encode_images(data), "metadata": metadata, "transient": transient}
        msg_type = "update_display_data" if update else "display_data"
        msg = self._message(msg_type, json_clean(content), {})
        for hook in self._hooks:
            msg = hook(msg)
            if msg is None:
                return
        self._send(msg)

    def clear_output(self, wait=False):
        self._flush_streams()
        self._send(self._message("clear_output", {"wait": wait}, dict(self._engine_md)))

    def _send(self, msg: dict) -> None:
        self._pub(
            msg["msg_type"],
            jsonable(msg["content"]),
            msg.get("parent_header") or {},
            jsonable(msg.get("metadata") or {}),
            list(msg.get("buffers") or []),
            self.topic,
        )


class DataPublisher:
    """``data_message`` publisher, as ``ipyparallel.engine.datapub.ZMQDataPublisher``.

    The stock kernel never sets this publisher's topic, so it is the bare ``b"datapub"``.
    """

    topic = b"datapub"

    def __init__(self, publish: Publish, engine_uuid: str, thresholds: Dict[str, int]) -> None:
        self._publish = publish
        self._engine = engine_uuid
        self._thresholds = thresholds
        self.parent_header: dict = {}

    def set_parent(self, parent: dict) -> None:
        self.parent_header = _header_of(parent)

    def publish_data(self, data: dict) -> None:
        """Publish a ``data_message`` on IOPub (``ipyparallel.datapub.publish_data``).

        Parameters
        ----------
        data : dict
            The data to be published. Think of it as a namespace.
        """
        buffers = serialize_object(data, **self._thresholds)
        content = json_clean(dict(keys=list(data.keys())))
        self._publish(
            "data_message", jsonable(content), self.parent_header,
            {"engine": self._engine}, buffers, self.topic,
        )


class KernelStub:
    """What ``get_ipython().kernel`` offers on a pxfabric engine.

    The stock engine exposes its ``IPythonParallelKernel``; user code mostly reads identities
    and the current parent from it. Sockets, sessions and the event loop do not exist here.
    """

    eventloop = None
    session = None
    iopub_socket = None
    _allow_stdin = False  # no stdin channel: input()/getpass() raise as in the stock engine

    def __init__(self, engine_id: int, engine_uuid: str) -> None:
        self.engine_id = engine_id
        self.int_id = engine_id
        self.ident = engine_uuid
        self.log = logging.getLogger("pxfabric.engine")
        self._parents: Dict[str, dict] = {"shell": {}, "control": {}}
        self.shell = None
        self.data_pub = None
        # ipykernel's own functions, so tracebacks through input() match the stock engine's.
        self.raw_input = types.MethodType(IPKernel.raw_input, self)
        self.getpass = types.MethodType(IPKernel.getpass, self)

    def get_parent(self, channel: str = "shell") -> dict:
        """The message being handled on ``channel`` (``"shell"`` or ``"control"``)."""
        return self._parents.get(channel, {})

    def set_parent(self, ident: Any, parent: dict, channel: str = "shell") -> None:
        self._parents[channel] = parent


class _LazyCompleter:
    """``shell.Completer``, created on first use.

    ``InteractiveShell.__init__`` builds its ``IPCompleter`` at once, and importing the completer
    imports ``jedi``: ~60 ms of CPU per rank at start-up for a feature that engines only use
    when user code asks for completions. The class keeps its name (``ZMQInteractiveShell``, as on
    stock engines); this descriptor on it stands in for the attribute until it is read.
    """

    def __get__(self, shell, owner=None):
        if shell is None:
            return self
        completer = shell.__dict__.get("_pxf_completer")
        if completer is None:
            _original_init_completer(shell)  # assigns through __set__ below
            completer = shell.__dict__["_pxf_completer"]
        return completer

    def __set__(self, shell, value):
        shell.__dict__["_pxf_completer"] = value


_original_init_completer = InteractiveShell.init_completer


def _install_lazy_completer() -> None:
    if not isinstance(ZMQInteractiveShell.__dict__.get("Completer"), _LazyCompleter):
        ZMQInteractiveShell.Completer = _LazyCompleter()  # type: ignore[attr-defined]
        ZMQInteractiveShell.init_completer = lambda self: None  # the descriptor does it on demand


class CellNameCompiler(XCachingCompiler):
    """ipykernel's compiler, remembering the file names it gave recent cells.

    ``XCachingCompiler.get_code_name`` hashes the whole cell with a pure-Python murmur2 on every
    execution (about 1 µs per 4 bytes): a ``%px`` loop re-runs the same cell on every rank. The
    name depends on the cell's text only, so it is kept for the last cells run."""

    _names: Dict[str, str] = {}

    def get_code_name(self, raw_code, code, number):
        if os.environ.get("IPYKERNEL_CELL_NAME") is not None:  # ipykernel's override, read each time
            return super().get_code_name(raw_code, code, number)
        names = self._names
        name = names.get(raw_code)
        if name is None:
            name = super().get_code_name(raw_code, code, number)
            if len(names) >= 256:
                names.clear()
            names[raw_code] = name
        return name


def make_shell(
    kernel: KernelStub,
    profile_dir: Any,
    user_ns: Optional[dict],
    error_sink: Callable[[str, str, List[str]], None],
    config_args: Iterable[str] = (),
) -> ZMQInteractiveShell:
    """Create the process-wide ``ZMQInteractiveShell`` singleton for an engine.

    Parameters
    ----------
    kernel : KernelStub
        Becomes ``shell.kernel``.
    profile_dir : IPython.core.profiledir.ProfileDir
        The engine's profile directory.
    user_ns : dict or None
        Initial user namespace (the stock engine passes an empty dict).
    error_sink : callable
        ``error_sink(ename, evalue, stb)`` publishes the IOPub ``error`` message that
        ipykernel's ``_showtraceback`` would send.
    config_args : iterable of str
        Command-line style traitlets options (``--InteractiveShell.colors=nocolor``).
    """
    if InteractiveShell.initialized():
        raise RuntimeError(
            "an IPython shell already exists in this process; one EngineRuntime per process"
        )
    _install_lazy_completer()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"  # as the stock engine
    config_args = list(config_args)
    if config_args:
        from traitlets.config.loader import KVArgParseConfigLoader

        config.merge(KVArgParseConfigLoader(argv=config_args, aliases={}, flags={}).load_config())
    shell = ZMQInteractiveShell.instance(
        config=config,
        profile_dir=profile_dir,
        user_ns={} if user_ns is None else user_ns,
        kernel=kernel,
        compiler_class=CellNameCompiler,
        displayhook_class=DisplayHook,
        display_pub_class=DisplayPublisher,
    )

    def _showtraceback(self, etype, evalue, stb):
        _flush_std()
        self._last_traceback = stb
        error_sink(str(etype.__name__), str(evalue), stb)

    def set_parent(self, parent):
        # ZMQInteractiveShell.set_parent without the traitlets round trip (hot path).
        values = getattr(self, "_trait_values", None)
        if values is not None:
            values["parent_header"] = parent
        else:  # pragma: no cover - other traitlets layouts
            self.parent_header = parent
        self.displayhook.set_parent(parent)
        self.display_pub.set_parent(parent)
        if hasattr(self, "_data_pub"):
            self._data_pub.set_parent(parent)
        for stream in (sys.stdout, sys.stderr):
            setter = getattr(stream, "set_parent", None)
            if setter is not None:
                try:
                    setter(parent)
                except Exception:
                    pass

    should_run_async = shell.should_run_async

    def _should_run_async(self, raw_cell, *, transformed_cell=None, preprocessing_exc_tuple=None):
        # IPython compiles every cell once more only to learn whether it awaits at top level;
        # a cell without "await" or "async" cannot (IPython's own answer otherwise).
        if (transformed_cell is not None and preprocessing_exc_tuple is None
                and "await" not in transformed_cell and "async" not in transformed_cell):
            return False
        return should_run_async(raw_cell, transformed_cell=transformed_cell,
                                preprocessing_exc_tuple=preprocessing_exc_tuple)

    def enable_gui(self, gui=None):
        # ZMQInteractiveShell.enable_gui lets ipykernel find the kernel through the running
        # IPython Application (the stock engine's IPEngine app has a `kernel`). An engine rank
        # has no Application, so `%matplotlib inline`, `%pylab` and `%gui` failed with "You
        # didn't specify a kernel": ipykernel's function is given the kernel stub instead.
        # Inline/agg select no event loop (`kernel.eventloop` stays None); a GUI loop is only
        # recorded, as nothing on a rank runs it.
        from ipykernel.eventloops import enable_gui as real_enable_gui  # on demand: imports zmq
        from IPython.core.error import UsageError

        try:
            real_enable_gui(gui, kernel)
            self.active_eventloop = gui
        except ValueError as e:
            raise UsageError("%s" % e) from e

    shell._showtraceback = types.MethodType(_showtraceback, shell)
    shell.enable_gui = types.MethodType(enable_gui, shell)
    shell.should_run_async = types.MethodType(_should_run_async, shell)
    shell.set_parent = types.MethodType(set_parent, shell)
    shell.exit_now = False
    kernel.shell = shell
    return shell
