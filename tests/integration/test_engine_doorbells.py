"""Doorbells take rings from the job's own ranks only (mpi/doorbell.hpp).

A rank's doorbell is an abstract unix datagram socket: no permissions, and its name is listed
in /proc/net/unix for everyone. A datagram from anyone but a rank of the job on this node (here:
another user, and a same-user process that is not a rank) is dropped and reported; a forged
"65535 messages are coming" would otherwise keep a rank polling for messages that never come.
The job keeps serving.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_job  # noqa: E402

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    yield from engine_job.module_job(tmp_path_factory, "doorbells", 2)


def _doorbell_names(pid: int) -> list:
    """Abstract socket names ('pxf-...', without the leading NUL) bound by process ``pid``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    names = []
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[6] in inodes and parts[7].startswith("@pxf-"):
                names.append(parts[7][1:])  # without the leading NUL ("@" in /proc)
    return names


SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for name in sys.argv[1:]:
    for kind in (b"m", b"b"):
        try:
            s.sendto(kind + b"\xff\xff", "\0" + name)
        except OSError:
            pass
print("sent")
"""


def test_rings_from_strangers_are_dropped_and_reported(job):
    rc = job.client()
    try:
        pids = rc[:].apply_sync(os.getpid)
    finally:
        job.close_client(rc)
    names = [n for pid in pids for n in _doorbell_names(pid)]
    assert names, "no doorbell socket found for the ranks (doorbells off?)"
    argv = ["/usr/bin/python3", "-c", SENDER] + names
    # another user, then this user from a process that is not a rank
    for user in (65534, None):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, user=user)
        assert out.stdout.strip() == "sent", out.stderr
    log = job.engine_log.read_text()
    assert "doorbell: ignored a datagram from pid" in log, log[-3000:]
    assert "(uid 65534)" in log and f"(uid {os.getuid()})" in log
    rc = job.client()
    try:  # still serving, every rank
        assert rc[:].apply_sync(os.getpid) == pids
        rc[:].execute("from mpi4py import MPI; r = MPI.COMM_WORLD.allreduce(1)", block=True)
        assert rc[:]["r"] == [2, 2]
    finally:
        job.close_client(rc)
