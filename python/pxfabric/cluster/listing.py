"""``pxcluster list``: the clusters recorded in profile directories and the registry, and
what state each is in (running, degraded, which side died and why)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List

from pxfabric import hostfile as hostmod

from .hub import registered_engines
from .locations import _registry_dir, ipython_dir
from .processes import _process
from .state import _read_json, _unlink, load_state


def _known_state_files(profile_dirs: Iterable[Path]) -> List[Path]:
    found: Dict[str, Path] = {}
    for pdir in profile_dirs:
        for p in sorted((Path(pdir) / "security").glob("pxcluster-*.json")):
            found[str(p)] = p
    reg = _registry_dir()
    if reg.is_dir():
        for entry in sorted(reg.glob("*.json")):
            data = _read_json(entry)
            path = Path(data["state_file"]) if data and data.get("state_file") else None
            if path is None or not path.exists():
                _unlink(entry)  # points at a cluster that is gone
                continue
            found.setdefault(str(path), path)
    for pdir in sorted(ipython_dir().glob("profile_*")):
        for p in sorted((pdir / "security").glob("pxcluster-*.json")):
            found.setdefault(str(p), p)
    return list(found.values())


_DEATH_MARKERS = ("exited on signal", "mpirun noticed", "MPI_ABORT", "non-zero status",
                  "lost the controller", "Traceback", "Error")


def engine_job_death(state: dict) -> "str | None":
    """Why the engine job ended, from the last telling line of its log (Open MPI says which
    rank died and how), or None."""
    log = (state.get("logs") or {}).get("engines")
    if not log:
        return None
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for marker in _DEATH_MARKERS:
        for line in reversed(lines):
            if marker in line:
                return " ".join(line.split())[:200]
    return None


def cluster_status(state: dict) -> dict:
    if state.get("slurm"):
        from pxfabric import slurm
        return slurm.slurm_status(state)
    ctl = _process(state.get("controller"))
    mpi = _process(state.get("engines"))
    starter = _process(state.get("pxcluster"))
    registered = None
    if ctl is not None:
        client_file = Path((state.get("connection_files") or {}).get("client", ""))
        got = registered_engines(client_file) if client_file.name else None
        registered = len(got) if got is not None else None
    n = state.get("n")
    if state.get("status") == "starting" and starter is not None:
        status = "starting"
    elif ctl is not None and mpi is not None:
        if registered is None:
            status = "controller not answering"
        elif registered >= (n or 0):
            status = "running"
        else:
            status = f"degraded: {registered} of {n} engines registered"
    elif ctl is not None:
        why = engine_job_death(state)
        status = ("engine job died (mpirun exited" + (f": {why}" if why else "") + "); "
                  "the controller is still up: `pxcluster stop` cleans up")
    elif mpi is not None:
        status = "controller died; the engine job is still running: `pxcluster stop` cleans up"
    else:
        status = "dead (both exited): `pxcluster stop` removes the state"
    return {
        "profile_dir": state.get("profile_dir"),
        "cluster_id": state.get("cluster_id") or "",
        "engine_kind": state.get("engine_kind"),
        "engines_expected": n,
        "engines_registered": registered,
        "controller_pid": (state.get("controller") or {}).get("pid"),
        "controller_alive": ctl is not None,
        "mpirun_pid": (state.get("engines") or {}).get("pid"),
        "mpirun_alive": mpi is not None,
        "started": state.get("start_time_iso"),
        "hosts": state.get("hosts"),
        "hostfile": state.get("hostfile"),
        "status": status,
        "state_file": state.get("state_file"),
    }


def list_clusters(profile_dirs: Iterable[Path] = ()) -> List[dict]:
    out = []
    for path in _known_state_files(profile_dirs):
        state = load_state(path)
        if state is not None:
            out.append(cluster_status(state))
    return out


def format_list(rows: List[dict]) -> str:
    if not rows:
        return "no pxcluster clusters found"
    def pid(p, alive):
        return "-" if not p else f"{p} ({'alive' if alive else 'dead'})"
    table = [("PROFILE DIR", "CLUSTER ID", "ENGINES", "KIND", "CONTROLLER", "MPIRUN", "HOSTS",
              "STATUS")]
    for r in rows:
        reg = "?" if r["engines_registered"] is None else r["engines_registered"]
        slurm_job = r.get("slurm_job")
        table.append((r["profile_dir"], r["cluster_id"] or "(none)",
                      f"{reg}/{r['engines_expected']}", str(r["engine_kind"]),
                      "in the job" if slurm_job else pid(r["controller_pid"], r["controller_alive"]),
                      f"slurm job {slurm_job}" if slurm_job
                      else pid(r["mpirun_pid"], r["mpirun_alive"]),
                      hostmod.format_hosts(r.get("hosts")), r["status"]))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines = []
    for row in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(lines)
