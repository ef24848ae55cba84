"""``pxcluster stop``: every process of a recorded cluster by PID (the watcher first, then
the engine job through mpirun, then the controller), then its files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from .locations import resolve_profile_dir, state_path
from .messages import ClusterError, _say
from .processes import TERM_GRACE, _collect, _process, terminate
from .state import _unlink, load_state, remove_state


def _stop_from_state(state: dict, quiet: bool = False, grace: float = TERM_GRACE) -> dict:
    """Stop every process of a recorded cluster, then remove its files. Returns a summary."""
    watcher = _process(state.get("watcher"))
    # first: it must not restart the job we are stopping
    watcher_killed = terminate([watcher], grace=3.0) if watcher is not None else []
    if state.get("slurm"):
        from pxfabric import slurm
        return slurm.stop_slurm(state, quiet=quiet)
    say = (lambda m: None) if quiet else _say
    summary: Dict[str, Any] = {"killed": watcher_killed, "left": []}
    engine_procs = _collect(state, "engines")
    mpirun = _process(state.get("engines"))
    if engine_procs:
        say(f"stopping the engine job: PIDs {sorted(p.pid for p in engine_procs)}")
        summary["killed"] += terminate(engine_procs, grace, first=mpirun)
    ctl_procs = _collect(state, "controller")
    if ctl_procs:
        say(f"stopping the controller: PIDs {sorted(p.pid for p in ctl_procs)}")
        summary["killed"] += terminate(ctl_procs, grace, first=_process(state.get("controller")))
    # anything that appeared meanwhile (e.g. a rank spawned late)
    rest = _collect(state, "engines") + _collect(state, "controller")
    if rest:
        summary["killed"] += terminate(rest, grace)
    summary["left"] = [p.pid for p in _collect(state, "engines") + _collect(state, "controller")]
    if summary["killed"]:
        say(f"had to SIGKILL PIDs {summary['killed']}")
    removed = []
    for path in (state.get("connection_files") or {}).values():
        if _unlink(Path(path)):
            removed.append(path)
    summary["removed"] = removed
    if not summary["left"]:
        remove_state(Path(state["state_file"]))
    return summary


def stop_cluster(profile: Optional[str] = None, profile_dir: Optional[str] = None,
                 cluster_id: str = "", quiet: bool = False) -> dict:
    pdir = resolve_profile_dir(profile, profile_dir, create=False)
    spath = state_path(pdir, cluster_id or "")
    state = load_state(spath)
    if state is None:
        raise ClusterError(f"no pxcluster cluster recorded at {spath} "
                           "(see `pxcluster list`)")
    summary = _stop_from_state(state, quiet=quiet)
    if summary["left"]:
        raise ClusterError(f"processes {summary['left']} survived SIGKILL; state kept in {spath}")
    return summary
