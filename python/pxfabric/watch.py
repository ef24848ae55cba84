"""``pxcluster start --restart-hung SECONDS``: restart the engine job by itself when a rank stays
stuck after an interrupt.

A small process started by ``pxcluster start`` in its own session (recorded in the state file as
``watcher``, stopped first by ``pxcluster stop``; output in ``<profile>/log/pxwatch-<id>.log``).
Once a second it asks every rank where it is (``pxf_where_request``, :mod:`pxfabric.where`: the
ranks answer from their watch thread even while stuck in MPI). A rank that an interrupt has not
brought back to Python for ``SECONDS`` (``interrupted_for`` in its answer) makes it run
:func:`pxfabric.restart.restart_cluster`: the same job again, same engine ids, the controller and
the clients kept; the stuck work fails with ``EngineError``. A rank that is merely busy (no
interrupt sent) is never restarted. It exits when the cluster's state file or controller is gone.
For a Slurm cluster it runs where ``pxcluster start --slurm`` ran (the login node) and restarts
through the batch job (:func:`pxfabric.slurm.restart_slurm`); it exits when the job ended.

    /usr/bin/python3 -m pxfabric.watch --profile-dir DIR [--cluster-id ID] --seconds S
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pxfabric import cluster as cl

POLL = 1.0          # seconds between where-requests
SLURM_CHECK = 30.0  # seconds between squeue calls for a Slurm cluster's job
ANSWER_TIMEOUT = 3.0


def _say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} pxwatch: {msg}", flush=True)


def stuck_ranks(states: Dict[int, dict], seconds: float) -> List[int]:
    """Engines an interrupt has not brought back to Python for ``seconds`` or more."""
    return sorted(eid for eid, s in states.items()
                  if s.get("interrupted_for") is not None and float(s["interrupted_for"]) >= seconds)


_job_checked = 0.0


def _alive(state: dict, client_file: Path) -> bool:
    """The controller runs: a local one by its PID; a Slurm job's (inside the batch job) while
    its connection file is there and Slurm says the job runs (asked every SLURM_CHECK s)."""
    global _job_checked
    if not state.get("slurm"):
        return cl._process(state.get("controller")) is not None
    if not client_file.exists():
        return False
    if time.monotonic() - _job_checked >= SLURM_CHECK:
        from pxfabric import slurm
        _job_checked = time.monotonic()
        with contextlib.suppress(cl.ClusterError):
            if slurm.job_info(state["slurm"]["job_id"]).get("state") not in ("RUNNING", "PENDING",
                                                                                "CONFIGURING"):
                return False
    return True


def watch(profile_dir: str, cluster_id: str, seconds: float, poll: float = POLL) -> int:
    import ipyparallel as ipp

    from pxfabric import restart, where

    pdir = Path(profile_dir)
    spath = cl.state_path(pdir, cluster_id)
    client_file = cl.connection_files(pdir, cluster_id)["client"]
    _say(f"watching {spath}: restart the job when a rank stays stuck {seconds:g} s after an "
         "interrupt")
    rc = None
    try:
        while True:
            state = cl.load_state(spath)
            if state is None or not _alive(state, client_file):
                _say("the cluster is gone; exiting")
                return 0
            if rc is None:
                try:
                    rc = ipp.Client(str(client_file), timeout=10)
                except Exception as e:  # the controller may be busy starting: try again
                    _say(f"cannot connect yet ({type(e).__name__}: {e})")
                    time.sleep(poll)
                    continue
            states = where.collect(rc, timeout=ANSWER_TIMEOUT) if rc.ids else {}
            stuck = stuck_ranks(states, seconds)
            if stuck:
                eids = where.ranges(stuck)
                _say(f"engine(s) {eids} still stuck {seconds:g} s after an interrupt "
                     f"({states[stuck[0]].get('where') or 'in native code'}): restarting the job")
                try:
                    new = restart.restart_cluster(profile_dir=str(pdir), cluster_id=cluster_id,
                                                  quiet=True)
                    _say(f"restarted {new['n']} engines in {new.get('restart_seconds', 0):.1f} s")
                except cl.ClusterError as e:
                    _say(f"restart failed: {e}")
                rc.close()
                rc = None
            time.sleep(poll)
    finally:
        if rc is not None:
            rc.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m pxfabric.watch", description=__doc__.split("\n")[0])
    p.add_argument("--profile-dir", required=True)
    p.add_argument("--cluster-id", default="")
    p.add_argument("--seconds", type=float, required=True)
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    try:
        return watch(args.profile_dir, args.cluster_id, args.seconds)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
