"""pxfabric.processes on real processes (``sleep``, and ``sleep`` that ignores SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
import time

import psutil
import pytest

from pxfabric import processes


def _sleeper(ignore_term: bool = False) -> subprocess.Popen:
    """``sleep 60``; with ``ignore_term`` SIGTERM is ignored (inherited across the exec)."""
    trap = 'trap "" TERM; ' if ignore_term else ""
    p = subprocess.Popen(["sh", "-c", f"{trap}echo ready; exec sleep 60"], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.fixture
def popens():
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(5)
        p.stdout.close()


def test_kill_sigkills_without_sigterm_and_skips_the_gone(popens):
    a, b = _sleeper(ignore_term=True), _sleeper()
    popens += [a, b]
    b.kill()
    b.wait(5)   # reaped: gone (psutil refuses to signal it)
    procs = [psutil.Process(a.pid)]
    with pytest.raises(psutil.NoSuchProcess):
        procs.append(psutil.Process(b.pid))
    assert processes.kill(procs) == [a.pid]
    assert not processes.alive(procs)
    assert a.wait(5) == -signal.SIGKILL
    assert processes.kill(procs) == []


def test_terminate_gives_first_its_own_grace(popens):
    leader, other = _sleeper(ignore_term=True), _sleeper()
    popens += [leader, other]
    procs = [psutil.Process(leader.pid), psutil.Process(other.pid)]
    t0 = time.monotonic()
    killed = processes.terminate(procs, 0.3, first=procs[0], first_grace=1.0)
    took = time.monotonic() - t0
    # the leader ignored SIGTERM: first_grace passed, then everyone got SIGTERM, then grace
    assert killed == [leader.pid]
    assert took >= 1.3, took
    assert leader.wait(5) == -signal.SIGKILL
    assert other.wait(5) == -signal.SIGTERM


def test_terminate_first_grace_ends_when_all_are_gone(popens):
    leader = _sleeper()
    popens.append(leader)
    proc = psutil.Process(leader.pid)
    t0 = time.monotonic()
    assert processes.terminate([proc], 0.5, first=proc, first_grace=60.0) == []
    assert time.monotonic() - t0 < 30   # not the whole first_grace
    assert leader.wait(5) == -signal.SIGTERM
