"""Stopping processes by PID: SIGTERM, wait, SIGKILL what is left.

One helper for ``pxcluster`` (:mod:`pxfabric.cluster`, :mod:`pxfabric.restart`,
:mod:`pxfabric.connect`), the test harnesses (``tests/integration/cluster.py``,
``engine_job.py``, ``tests/python/harness.py``), the tests and benchmarks that stop processes
themselves, and the benchmarks' harness (``bench/_harness.py``).
Processes are ``psutil.Process`` objects, which refuse to signal a PID that was reused; nothing
is ever found or signalled by name. Callers that also reap their own children
(``subprocess.Popen.wait``) do so after these return.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Iterable, List, Optional, Union

import psutil

ProcessOrProcesses = Union[psutil.Process, Iterable[psutil.Process], None]


def is_alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; only its parent's wait is missing)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def alive(procs: Iterable[psutil.Process]) -> List[psutil.Process]:
    """The processes of ``procs`` that are still alive."""
    return [p for p in procs if is_alive(p)]


def send(procs: Iterable[psutil.Process], sig: int) -> List[psutil.Process]:
    """Send ``sig`` to each process; the ones it was delivered to (gone ones are skipped)."""
    sent = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)
            sent.append(p)
    return sent


def wait_gone(procs: Iterable[psutil.Process], timeout: float) -> List[psutil.Process]:
    """Wait until every process exited (a zombie counts as gone); the ones still alive.

    Not ``psutil.wait_procs``: it waits on each process in turn for up to 1/len(procs) s, and
    on a rank that already exited but is not yet reaped by mpirun, so 9 processes cost ~1 s.
    """
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        left = alive(procs)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.01)


def terminate(procs: Iterable[psutil.Process], grace: float,
              first: ProcessOrProcesses = None,
              first_grace: Optional[float] = None) -> List[int]:
    """SIGTERM (``first`` alone, then the rest), wait ``grace`` s, SIGKILL what is left.
    Returns the PIDs SIGKILLed.

    ``first`` (a process or several, e.g. mpirun) gets SIGTERM on its own and ``first_grace``
    s (default ``grace / 2``) to take the others down itself (mpirun forwards the signal to its
    ranks); the wait ends early once every process is gone."""
    targets = alive(procs)
    if not targets:
        return []
    if isinstance(first, psutil.Process):
        first = [first]
    leaders = [p for p in (first or ()) if p in targets]
    if leaders:
        send(leaders, signal.SIGTERM)
        # give mpirun a moment to forward the signal and take its ranks down itself
        targets = wait_gone(targets, grace / 2 if first_grace is None else first_grace)
    send(targets, signal.SIGTERM)
    return kill(wait_gone(targets, grace))


def kill(procs: Iterable[psutil.Process], timeout: float = 5.0) -> List[int]:
    """SIGKILL each process now (no SIGTERM first: for processes already asked to stop, or
    whose grace is over) and wait up to ``timeout`` s for them to be gone. Returns the PIDs
    SIGKILLed (gone ones are skipped)."""
    procs = list(procs)
    killed = [p.pid for p in send(procs, signal.SIGKILL)]
    wait_gone(procs, timeout)
    return killed


def stop_procs(procs: Iterable[psutil.Process], grace: float = 5.0) -> List[int]:
    """:func:`terminate` without a leader: SIGTERM all, wait ``grace`` s, SIGKILL the rest."""
    return terminate(procs, grace)


def descendants(proc: Optional[psutil.Process]) -> List[psutil.Process]:
    """``proc`` and all its current descendants ([] for None; [proc] if it is gone)."""
    if proc is None:
        return []
    try:
        return [proc] + proc.children(recursive=True)
    except psutil.Error:
        return [proc]
