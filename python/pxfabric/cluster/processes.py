"""A recorded cluster's processes, found by PID only: each checked against its start time (a
reused PID is never touched), with its descendants and the members of the sessions we created.
Stopping them is :mod:`pxfabric.processes` (shared with the tests and benchmarks)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import psutil

from pxfabric.processes import descendants as _tree
from pxfabric.processes import is_alive as _is_alive
from pxfabric.processes import terminate, wait_gone  # noqa: F401  (pxcluster's names for them)

TERM_GRACE = 8.0            # seconds between SIGTERM and SIGKILL in stop


def _proc_record(proc: psutil.Process) -> Dict[str, Any]:
    try:
        return {"pid": proc.pid, "create_time": proc.create_time()}
    except psutil.Error:
        return {"pid": proc.pid, "create_time": None}


def _process(record: Optional[dict]) -> Optional[psutil.Process]:
    """The live process a state record names, or None (dead, zombie, or PID reused)."""
    if not record or not record.get("pid"):
        return None
    try:
        proc = psutil.Process(int(record["pid"]))
        created = record.get("create_time")
        if created is not None and abs(proc.create_time() - float(created)) > 1.0:
            return None  # the PID now belongs to someone else
    except (psutil.Error, ValueError, TypeError):
        return None
    return proc if _is_alive(proc) else None


def _session_members(leader_pid: int, since: float) -> List[psutil.Process]:
    """Live processes in the session ``leader_pid`` created (and not re-parented away from).

    A session id stays reserved while any member lives, so matching on it cannot hit a
    stranger even after the leader died; ``since`` guards against anything older anyway.
    """
    out = []
    for proc in psutil.process_iter(["create_time"]):
        try:
            if proc.info["create_time"] is None or proc.info["create_time"] < since - 1.0:
                continue
            if os.getsid(proc.pid) == leader_pid and _is_alive(proc):
                out.append(proc)
        except (OSError, psutil.Error):
            continue
    return out


def _collect(state: dict, group: str) -> List[psutil.Process]:
    """Every live process of ``group`` ("controller" or "engines") of a recorded cluster."""
    root = state.get(group) or {}
    since = float(state.get("start_time") or 0)
    procs: Dict[int, psutil.Process] = {}
    leader = _process(root)
    for p in _tree(leader):
        procs[p.pid] = p
    for rec in root.get("descendants", []):
        for p in _tree(_process(rec)):
            procs.setdefault(p.pid, p)
    if root.get("pid") and (leader is not None or not _pid_reused(root)):
        for p in _session_members(int(root["pid"]), since):
            for q in _tree(p):
                procs.setdefault(q.pid, q)
    return [p for p in procs.values() if _is_alive(p)]


def _pid_reused(record: dict) -> bool:
    try:
        proc = psutil.Process(int(record["pid"]))
        created = record.get("create_time")
        return created is not None and abs(proc.create_time() - float(created)) > 1.0
    except (psutil.Error, ValueError, TypeError, KeyError):
        return False
