"""Per-request capture of ``sys.stdout``/``sys.stderr`` (and optionally fds 1 and 2).

Stand-ins for ``ipykernel.iostream.OutStream`` that need no IOPub thread: text is buffered and
handed to a callback as one ``stream`` message when flushed. A flush happens when the runtime
finishes a request (so output always precedes the reply), before display/result/error messages
(as in ipykernel), when a write finds the buffer older than ``flush_interval``, and whenever
the host calls :meth:`OutStream.flush` from any thread.
"""

from __future__ import annotations

import codecs
import ctypes
import io
import os
import select
import threading
import time
from typing import Callable, Optional

from .jsonsafe import clean_text

#: ``emit(name, text, parent_header)`` publishes one ``stream`` message.
Emit = Callable[[str, str, dict], None]

try:
    _libc_fflush = ctypes.CDLL(None).fflush
    _libc_fflush.argtypes = [ctypes.c_void_p]
except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
    _libc_fflush = None


class OutStream(io.TextIOBase):
    """Text stream that buffers writes and publishes them as ``stream`` messages.

    Parameters
    ----------
    name : str
        ``"stdout"`` or ``"stderr"``; the ``name`` field of the messages.
    emit : callable
        ``emit(name, text, parent_header)``, called with the buffered text on flush.
    fileno : int, optional
        Value returned by :meth:`fileno` (ipykernel returns a copy of the original fd).

    Notes
    -----
    Thread-safe: writes may come from any thread; flushes are serialized so messages keep the
    order in which text was written.
    """

    flush_interval = 0.2
    encoding = "UTF-8"
    errors = "strict"

    def __init__(self, name: str, emit: Emit, fileno: Optional[int] = None) -> None:
        super().__init__()
        self.name = name
        self.parent_header: dict = {}
        self._emit = emit
        self._fileno = fileno
        self._lock = threading.RLock()
        self._parts: list = []
        self._pending_since: Optional[float] = None
        self._capture: Optional[FdCapture] = None
        self._is_closed = False

    # -- file protocol -------------------------------------------------------------------
    def set_parent(self, parent: dict) -> None:
        """Associate subsequent output with the request ``parent`` (header or whole message)."""
        self.parent_header = _header_of(parent)

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return self._is_closed

    def fileno(self) -> int:
        if self._fileno is None:
            raise io.UnsupportedOperation("fileno")
        return self._fileno

    def write(self, string: str) -> int:  # type: ignore[override]
        if not isinstance(string, str):
            raise TypeError(f"write() argument must be str, not {type(string)}")
        if self._is_closed:
            raise ValueError("I/O operation on closed file")
        if string:
            self._append(string)
        return len(string)

    def writelines(self, lines) -> None:  # type: ignore[override]
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Publish buffered text now (also drains a captured fd).

        Always under the lock, even when nothing is buffered: another thread (the host's
        periodic flush) may have taken the text and still be publishing it, and a caller that
        publishes ``status: idle`` next must not overtake that stream message."""
        with self._lock:
            if self._capture is not None:
                self._capture.drain()
            if not self._parts:
                return
            text = "".join(self._parts)
            self._parts.clear()
            self._pending_since = None
            self._emit(self.name, clean_text(text), self.parent_header)

    def close(self) -> None:
        self._is_closed = True

    # -- internals -----------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """True when text is waiting to be published."""
        return bool(self._parts)

    def _append(self, text: str) -> None:
        with self._lock:
            self._parts.append(text)
            now = time.monotonic()
            if self._pending_since is None:
                self._pending_since = now
            elif now - self._pending_since >= self.flush_interval:
                self.flush()


class FdCapture:
    """Route an OS file descriptor into an :class:`OutStream`.

    ``fd`` is replaced by the write end of a pipe; a daemon thread (and every flush of the
    stream) reads the pipe and appends the decoded text to the stream. This catches output of
    C extensions, ``os.system`` and subprocesses, as ipykernel's ``watchfd`` does.

    Parameters
    ----------
    fd : int
        The descriptor to capture (1 or 2).
    stream : OutStream
        Where the text goes.
    """

    def __init__(self, fd: int, stream: OutStream) -> None:
        self.fd = fd
        self.stream = stream
        self.original = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self._read = read_end
        self._wake_read, self._wake_write = os.pipe()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._thread = threading.Thread(
            target=self._run, name=f"pxfabric-fd{fd}", daemon=True
        )
        self._thread.start()

    def drain(self) -> None:
        """Move whatever is readable from the pipe into the stream (non-blocking)."""
        if _libc_fflush is not None:
            _libc_fflush(None)
        with self.stream._lock:
            self._drain_locked()

    def _drain_locked(self) -> bool:
        """Read until the pipe is empty; return True at end-of-file."""
        chunks = []
        eof = False
        while True:
            try:
                chunk = os.read(self._read, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        if chunks:
            text = self._decoder.decode(b"".join(chunks))
            if text:
                self.stream._append(text)
        return eof

    def _run(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self._read, self._wake_read], [], [])
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            if self._wake_read in ready:
                return
            with self.stream._lock:
                if self._drain_locked():
                    return

    def close(self) -> None:
        """Restore the original descriptor and stop the reader thread."""
        try:
            self.drain()
        finally:
            os.dup2(self.original, self.fd)
            os.write(self._wake_write, b"x")
            self._thread.join(timeout=5)
            with self.stream._lock:
                self._drain_locked()
            for fd in (self._read, self._wake_read, self._wake_write, self.original):
                try:
                    os.close(fd)
                except OSError:
                    pass


def _header_of(msg_or_header: Optional[dict]) -> dict:
    """Return the header of a message, or the header itself (like ``extract_header``)."""
    if not msg_or_header:
        return {}
    header = msg_or_header.get("header")
    if isinstance(header, dict):
        return header
    return msg_or_header
