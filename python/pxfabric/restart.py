"""``pxcluster restart``: a new engine job with the same engine ids, under the same controller.

When a cell hangs (one rank inside a collective the others never join), the MPI job cannot be
brought back into Python: the only cure is a new job. Restarting the whole cluster would lose the
controller, its task records and every connected client; this restarts **only the engine job**:

1. the old job is stopped (SIGTERM to ``mpirun`` and, for a job on this machine, to its ranks
   at once: rank 0 then unregisters every engine of the job over the fabric link; what is still
   alive after a grace period gets SIGKILL), and we wait until the controller no longer lists
   any of its engines (a job whose rank 0 was killed before it could unregister is noticed by
   the controller only at its next probe of the fabric link, so once every process exited we
   send stock ``unregistration_request`` messages for what is left);
2. the same ``mpirun`` command line is started again with the same environment (read from the
   old ``mpirun`` while it lives, else the one recorded at start, else rebuilt as ``start``
   builds it; for a hostfile job ``IPP_CONNECTION_INFO`` is re-read from the engine connection
   file);
3. every rank registers asking for id = its rank (pxengine's gateway, and stock ``ipengine
   --mpi``); the controller gives a requested id whenever no live engine holds it, as stock's
   hub does, so the new job gets ids 0..N-1 again.

Clients see the unregistrations (outstanding work on the old engines fails with
``EngineError``: direct requests in the client, load-balanced tasks in the controller, or a
retry on the new engines when the task had ``retries``) and then the registrations of the same
ids: the same ``rc`` keeps working, and every record from before still answers ``get_result``
and ``db_query``.

A Slurm cluster (``pxcluster start --slurm``) runs its controller inside the batch job: there
the batch script does steps 1-3 itself when its shell gets USR2 (``slurm.restart_slurm``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil

from pxfabric import cluster as cl

RESTART_GRACE = 3.0          # seconds between SIGTERM and SIGKILL for the old job's processes
JOB_UNREGISTER_WAIT = 0.1    # seconds for rank 0's own unregistration to arrive, once the job exited
UNREGISTER_WAIT = 5.0        # seconds for the controller to act on our unregistration requests
DEFAULT_RESTART_TIMEOUT = cl.DEFAULT_TIMEOUT

# What of the start's environment the state file keeps (for a restart after the old mpirun is
# gone): the knobs of MPI, pxfabric and Python, not the whole environment of the user's shell.
_RECORDED_PREFIXES = ("OMPI_", "PMIX_", "PRTE_", "UCX_", "PXF_", "IPP_", "OMP_", "MKL_",
                      "OPENBLAS_")
_RECORDED_NAMES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "IPYTHONDIR",
                   "MPLBACKEND")


def recorded_env(env: Dict[str, str]) -> Dict[str, str]:
    """The part of the engine job's environment worth keeping in the state file.

    ``IPP_CONNECTION_INFO`` (the controller's key) is left out: a restart re-reads it from the
    engine connection file.
    """
    return {k: v for k, v in env.items()
            if (k.startswith(_RECORDED_PREFIXES) or k in _RECORDED_NAMES)
            and k != "IPP_CONNECTION_INFO"}


def _id_span(ids) -> str:
    ids = sorted(ids)
    if ids and ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 1:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(str(i) for i in ids)


def record_restart(state: dict, elapsed: float) -> None:
    """Count a restart in the state (``pxcluster list``, the watcher and benchmarks read it)."""
    state["restarts"] = int(state.get("restarts") or 0) + 1
    state["restart_time"] = time.time()
    state["restart_time_iso"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    state["restart_seconds"] = round(elapsed, 2)


def _job_env(state: dict, mpirun: Optional[psutil.Process]) -> Dict[str, str]:
    """The environment the engine job was started with, as faithfully as we can get it."""
    env: Optional[Dict[str, str]] = None
    if mpirun is not None:
        with contextlib.suppress(psutil.Error, OSError):
            env = dict(mpirun.environ())
    if not env:
        # the old mpirun is gone: rebuild as start did, then what start recorded
        env = cl.process_env()
        argv = list((state.get("engines") or {}).get("argv") or [])
        if not state.get("hostfile"):
            cl._local_mpi_env(env, argv)
        env.update((state.get("engines") or {}).get("env") or {})
        env["IPP_PROFILE_DIR"] = str(state["profile_dir"])
        env["IPP_CLUSTER_ID"] = state.get("cluster_id") or ""
    return env


def _job_engines(client_file: Path, state: dict, registered: Dict[int, str]) -> Dict[int, str]:
    """The engines of the cluster's MPI job among those registered: for pxengine, the ones the
    hub says belong to a fabric job (a stock engine attached by hand is left alone); stock
    ``ipengine --mpi`` ranks carry no job, so then every registered engine."""
    if state.get("engine_kind") != "pxengine":
        return dict(registered)
    reply = cl.query_hub(client_file, "pxf_engines_request", {})
    content = (reply or {}).get("content") or {}
    if content.get("status") != "ok":
        return dict(registered)
    return {int(i): e["uuid"] for i, e in (content.get("engines") or {}).items()
            if isinstance(e, dict) and e.get("job") and int(i) in registered}


def _stop_job(procs: List[psutil.Process], mpirun: Optional[psutil.Process], across_hosts: bool,
              grace: float) -> List[int]:
    """SIGTERM the old job, SIGKILL what is left after ``grace``; the PIDs SIGKILLed.

    A job on this machine gets SIGTERM on every rank at once, next to mpirun: rank 0 then
    unregisters the job at once (mpirun forwards a SIGTERM only about a second later). A job
    across hosts has only mpirun and its ssh sessions here: mpirun first, as ``stop`` does,
    so that the remote ranks get the signal through it.
    """
    return cl.terminate(procs, grace, first=mpirun if across_hosts else None)


def _unregister(client_file: Path, ids: List[int], timeout: float = cl.QUERY_TIMEOUT) -> bool:
    """Stock ``unregistration_request`` for each id, on one connection, then a
    ``connection_request`` whose reply says the hub has read them all (it sends no reply to an
    unregistration). False if the hub did not answer."""
    try:
        with cl.hub_connection(client_file) as conn:
            if conn is None:
                return False
            session, sock = conn
            for eid in ids:
                session.send(sock, "unregistration_request", {"id": eid})
            session.send(sock, "connection_request", {})
            return bool(sock.poll(int(timeout * 1000)))
    except Exception:
        return False


def _rotate_log(log: Path) -> Optional[Path]:
    """Keep the old job's log as ``<log>.1`` (what a hung job printed is worth reading)."""
    if not log.exists():
        return None
    old = log.with_name(log.name + ".1")
    with contextlib.suppress(OSError):
        os.replace(log, old)
        return old
    return None


def _check_restartable(state: dict, spath: Path, sel: str):
    """The client file and the registered engines of a local cluster that can be restarted;
    ClusterError otherwise (still starting, no engine job, no controller)."""
    if state.get("status") in ("starting", "restarting") and cl._process(state.get("pxcluster")):
        raise cl.ClusterError(
            f"the cluster is still {state['status']} (pxcluster pid "
            f"{state['pxcluster']['pid']}); try again when it is done")
    engines = state.get("engines") or {}
    if not engines.get("argv"):
        raise cl.ClusterError(f"the state {spath} records no engine job to restart")
    client_file = Path((state.get("connection_files") or {}).get("client", ""))
    ctl = cl._process(state.get("controller"))
    before = cl.registered_engines(client_file) if ctl is not None else None
    if ctl is None or before is None:
        why = ("is not running" if ctl is None else "does not answer")
        raise cl.ClusterError(
            f"the controller (pid {(state.get('controller') or {}).get('pid')}) {why}; "
            f"restart needs the controller: pxcluster stop {sel} && pxcluster start ...")
    return client_file, before


def restart_cluster(profile: Optional[str] = None, profile_dir: Optional[str] = None,
                    cluster_id: str = "", timeout: float = DEFAULT_RESTART_TIMEOUT,
                    grace: float = RESTART_GRACE, quiet: bool = False) -> dict:
    """Stop the engine job of a recorded cluster and start the same job again; return the
    updated state once all ``n`` engines registered.

    Raises :class:`pxfabric.cluster.ClusterError` when there is no cluster, its controller is
    not running (a restart keeps the controller: without one, stop and start), when the new
    job fails (with its log), and when the new engines did not get ids
    0..N-1 (the job is kept running then; the message says which ids were taken).
    """
    say = (lambda m: None) if quiet else cl._say
    pdir = cl.resolve_profile_dir(profile, profile_dir, create=False)
    cluster_id = cluster_id or ""
    spath = cl.state_path(pdir, cluster_id)
    if not spath.parent.is_dir():
        raise cl.ClusterError(f"no pxcluster cluster recorded at {spath} (no such profile "
                              "dir; see `pxcluster list`)")
    with cl._profile_lock(pdir):
        state = cl.load_state(spath)
        if state is None:
            raise cl.ClusterError(f"no pxcluster cluster recorded at {spath} "
                                  "(see `pxcluster list`; start one with `pxcluster start`)")
        sel = cl._selector_args(state)
        slurm_job = bool(state.get("slurm"))
        if not slurm_job:
            client_file, before = _check_restartable(state, spath, sel)
            state["status"] = "restarting"
            state["pxcluster"] = cl._proc_record(psutil.Process())
            cl.save_state(state)
    if slurm_job:  # outside the profile lock: the batch job does the work, we watch
        from pxfabric import slurm
        return slurm.restart_slurm(state, timeout, quiet=quiet)
    engines = state["engines"]
    n = int(state["n"])
    argv = list(engines["argv"])
    log = Path(engines.get("log") or cl.log_paths(pdir, cluster_id)["engines"])
    t0 = time.monotonic()
    mpi = None
    phases: Dict[str, float] = {}

    def mark(what: str) -> None:  # seconds since the restart began, per step (state file)
        phases[what] = round(time.monotonic() - t0, 3)
    try:
        with cl._signals_interrupt():
            # 1. the old job: stop it, and wait until the controller has let go of its engines
            mpirun = cl._process(engines)
            env = _job_env(state, mpirun)
            old_uuids = set(_job_engines(client_file, state, before).values())
            old_procs = cl._collect(state, "engines")
            mark("old_job_found_s")
            if old_procs:
                say(f"stopping the engine job: PIDs {sorted(p.pid for p in old_procs)}")
                killed = _stop_job(old_procs, mpirun, bool(state.get("hostfile")), grace)
                if killed:
                    say(f"had to SIGKILL PIDs {killed}")
                mark("old_job_exited_s")
                left = [p.pid for p in cl._collect(state, "engines")]
                if left:
                    raise cl.ClusterError(f"processes {left} of the old engine job survived "
                                          "SIGKILL; not starting a new one")
            # Every process of the old job has exited: its engines are gone. Rank 0 normally
            # unregistered them on SIGTERM, but mpirun may SIGKILL it first (it ends the job
            # as soon as other ranks die), and the controller would notice only at its next
            # probe of the fabric link (a heartbeat period): ask for what is left ourselves.
            deadline = time.monotonic() + JOB_UNREGISTER_WAIT
            asked = False
            while True:
                got = cl.registered_engines(client_file)
                if got is None:
                    raise cl.ClusterError(
                        "the controller stopped answering while the old engines went away; "
                        f"log {(state.get('logs') or {}).get('controller')}; "
                        f"pxcluster stop {sel} && pxcluster start ...")
                lingering = sorted(i for i, u in got.items() if u in old_uuids)
                if not lingering:
                    break
                if time.monotonic() > deadline:
                    if asked:
                        raise cl.ClusterError(
                            f"the controller still lists engines {_id_span(lingering)} of the "
                            f"old job {UNREGISTER_WAIT:.0f}s after asking to unregister them")
                    _unregister(client_file, lingering)
                    asked = True
                    deadline = time.monotonic() + UNREGISTER_WAIT
                time.sleep(0.05)
            others = dict(got)  # engines not of this job (e.g. one attached by hand)
            mark("old_engines_unregistered_s")

            # 2. the same job again
            if state.get("hostfile") or "IPP_CONNECTION_INFO" in env:
                info = cl._read_json(Path(state["connection_files"]["engine"]))
                if info is None:
                    raise cl.ClusterError("cannot read the engine connection file "
                                          f"{state['connection_files']['engine']}")
                env["IPP_CONNECTION_INFO"] = json.dumps(info, separators=(",", ":"))
            old_log = _rotate_log(log)
            mpi = cl._popen(argv, log, env, pdir)
            state["engines"] = dict(cl._proc_record(psutil.Process(mpi.pid)), argv=argv,
                                    log=str(log), descendants=[],
                                    env=engines.get("env") or recorded_env(env))
            cl.save_state(state)
            mark("new_job_started_s")
            say(f"engine job started (mpirun pid {mpi.pid})"
                + (f"; the old job's log is {old_log}" if old_log else ""))

            # 3. every rank registered again
            have: Dict[int, str] = {}
            deadline = time.monotonic() + timeout
            last_report = time.monotonic()
            while True:
                got = cl.registered_engines(client_file)
                if got is not None:
                    have = {i: u for i, u in got.items() if others.get(i) != u}
                if len(have) >= n:
                    break
                if mpi.poll() is not None:
                    raise cl.ClusterError(
                        f"the new engine job (mpirun pid {mpi.pid}) exited with status "
                        f"{mpi.returncode} after {len(have)} of {n} engines registered; "
                        f"log {log} (last lines):\n{cl._log_tail(log)}")
                if cl._process(state.get("controller")) is None:
                    raise cl.ClusterError(
                        "the controller exited while the new engines were registering; log "
                        f"{(state.get('logs') or {}).get('controller')}:\n"
                        f"{cl._log_tail(Path((state.get('logs') or {}).get('controller', '')))}")
                if time.monotonic() > deadline:
                    raise cl.ClusterError(
                        f"timed out after {timeout:.0f}s: only {len(have)} of {n} engines of "
                        f"the new job registered; log {log} (last lines):\n{cl._log_tail(log)}")
                if time.monotonic() - last_report > 15:
                    say(f"{len(have)} of {n} engines registered ...")
                    last_report = time.monotonic()
                time.sleep(0.05)

            # 4. remember the new job, by PID
            elapsed = time.monotonic() - t0
            state["engines"]["descendants"] = [
                cl._proc_record(p) for p in cl._tree(psutil.Process(mpi.pid))[1:]]
            state["status"] = "running"
            record_restart(state, elapsed)
            state["restart_phases"] = dict(phases, registered_s=round(elapsed, 3))
            state["hosts"] = cl.engine_hosts(client_file)
            cl.save_state(state)
    except BaseException as e:
        if mpi is not None and mpi.poll() is None:
            say("restart failed; stopping the new engine job (the controller stays up)",
                stream=sys.stderr)
            cl.terminate(cl._collect(state, "engines"), grace, first=cl._process(state["engines"]))
        state["status"] = "running"
        with contextlib.suppress(Exception):
            cl.save_state(state)
        if isinstance(e, cl._Interrupted):
            raise cl.ClusterError(str(e)) from None
        raise

    want = list(range(n))
    if sorted(have) != want:
        held = {i: u for i, u in others.items() if i < n}
        raise cl.ClusterError(
            f"the new engine job is running, but its engines got ids {_id_span(have)} instead "
            f"of {_id_span(want)}"
            + (f": ids {_id_span(held)} are held by engines not of this job "
               f"({', '.join(held[i] for i in sorted(held))})" if held else "")
            + f"; the state {spath} records the new job")
    say(f"restarted {n} engines (ids {_id_span(want)}) in {elapsed:.1f} s")
    return state
