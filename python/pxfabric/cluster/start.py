"""``pxcluster start``: the controller, then one MPI job of engines, recorded in the state file
as they start; on any failure everything started is stopped again."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

from pxfabric import hostfile as hostmod

from .hub import QUERY_TIMEOUT, engine_hosts, registered_engines
from .locations import _tag, connection_files, log_paths, resolve_profile_dir, state_path
from .messages import ClusterError, _say, _selector_args
from .processes import _proc_record, _process, _tree
from .programs import (DEFAULT_PXENGINE, ENGINE_KINDS, PYTHON, _local_mpi_env, controller_program,
                       engine_program, mpirun_command, process_env, profile_args)
from .state import STATE_VERSION, _profile_lock, _read_json, _unlink, load_state, save_state
from .stop import _stop_from_state

DEFAULT_TIMEOUT = 120.0     # seconds for the whole start (controller + all engines)


class _Interrupted(BaseException):
    pass


@contextlib.contextmanager
def _signals_interrupt():
    """Turn SIGTERM/SIGHUP into an exception while starting, so cleanup still runs."""
    def handler(signum, frame):
        raise _Interrupted(f"interrupted by signal {signum}")

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, h)


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"    (cannot read {path}: {e})"
    if not text:
        return "    (empty)"
    return "\n".join("    " + line for line in text[-lines:])


def _popen(argv: List[str], log: Path, env: Dict[str, str], cwd: Path):
    import subprocess

    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=str(cwd),
                                start_new_session=True)


def _host_diagnosis(plan: "_StartPlan") -> str:
    """For a failed start: the ranks' own errors and the hosts checked (hostfile.py)."""
    return hostmod.diagnose_failed_start(
        plan.entries, plan.address, mpi_args=plan.mpi_args,
        engine_info=_read_json(plan.cfiles["engine"]) or {}, engine_log=plan.logs["engines"],
        env=plan.env, engine_argv=plan.checked)


def check_hostfile(hostfile: str, *, mpi_args: Sequence[str] = (),
                   controller_args: Sequence[str] = (), engines: str = "pxengine",
                   profile: Optional[str] = None, profile_dir: Optional[str] = None,
                   timeout: float = hostmod.DEFAULT_CHECK_TIMEOUT) -> List["hostmod.HostCheck"]:
    """``pxcluster check``: every host of ``hostfile`` checked as a start would need it."""
    pdir = resolve_profile_dir(profile, profile_dir, create=False) \
        if (profile or profile_dir) else None
    env = process_env()
    engine = os.environ.get("PXF_ENGINE")
    engine_argv = (shlex.split(engine) if engine else [str(DEFAULT_PXENGINE)]) \
        if engines == "pxengine" else None
    return hostmod.check_hostfile(hostfile, mpi_args=mpi_args, controller_args=controller_args,
                                  engine_argv=engine_argv, profile_dir=pdir, env=env,
                                  timeout=timeout)


def _refuse_running(spath: Path, cfiles: Dict[str, Path], say) -> None:
    """Refuse to start over a live cluster of this profile and cluster id; clear a dead one's
    state and stale connection files. Call with the profile lock held."""
    old = load_state(spath)
    if old is not None:
        if old.get("slurm"):
            from pxfabric import slurm
            info = slurm.job_info(old["slurm"]["job_id"])
            live = bool(info) and info.get("state") not in slurm.ENDED
        else:
            live = bool(_process(old.get("controller")) or _process(old.get("engines")))
        if live or (old.get("status") == "starting" and _process(old.get("pxcluster"))):
            raise ClusterError(
                f"a cluster is already running for {old.get('profile_dir')} (cluster id "
                f"{old.get('cluster_id') or '(none)'}; state {spath}); stop it first with "
                f"`pxcluster stop {_selector_args(old)}`"
            )
        say(f"removing the state of a dead cluster ({spath})")
        _stop_from_state(old, quiet=True)
    elif cfiles["client"].exists():
        if registered_engines(cfiles["client"], timeout=1.5) is not None:
            raise ClusterError(
                f"a controller not started by pxcluster is serving {cfiles['client']}; "
                "stop it or choose another --cluster-id"
            )
        say(f"removing stale connection files in {cfiles['client'].parent}")
        for path in cfiles.values():
            _unlink(path)


@dataclasses.dataclass
class _StartPlan:
    """What a start checked and decided before starting anything."""
    n: int
    pdir: Path
    cluster_id: str
    spath: Path                      # the state file
    cfiles: Dict[str, Path]          # connection files: client, engine
    logs: Dict[str, Path]            # controller, engines
    ctl_argv: List[str]
    mpi_argv: List[str]
    env: Dict[str, str]              # of the controller and the engine job
    hostfile: Optional[str]
    mpi_args: Sequence[str]
    entries: List[hostmod.HostEntry]  # the hostfile's hosts
    address: Optional[hostmod.ControllerAddress]  # the controller's, with a hostfile
    checked: Optional[List[str]]     # what a failed start checks on each host
    timeout: float


def start_cluster(n: int, *, profile: Optional[str] = None, profile_dir: Optional[str] = None,
                  cluster_id: str = "", engines: str = "pxengine",
                  engine_cmd: Optional[str] = None, hostfile: Optional[str] = None,
                  mpi_args: Sequence[str] = (), mpirun: Optional[str] = None,
                  controller_args: Sequence[str] = (), engine_args: Sequence[str] = (),
                  timeout: float = DEFAULT_TIMEOUT, quiet: bool = False) -> dict:
    """Start a controller and one MPI job of ``n`` engines; return the state once all registered.

    On any failure (including the timeout) everything started is stopped, the state and
    connection files are removed, and :class:`ClusterError` says why and where the logs are.
    """
    if n < 1:
        raise ClusterError(f"-n must be at least 1 (got {n})")
    if engines not in ENGINE_KINDS:
        raise ClusterError(f"--engines must be one of {', '.join(ENGINE_KINDS)} (got {engines!r})")
    say = (lambda m, stream=None: None) if quiet else _say
    plan = _plan_start(n, profile, profile_dir, cluster_id or "", engines, engine_cmd, hostfile,
                       mpi_args, mpirun, controller_args, engine_args, timeout, say)
    with _profile_lock(plan.pdir):
        _refuse_running(plan.spath, plan.cfiles, say)
        state = _new_state(plan, profile, profile_dir, "custom" if engine_cmd else engines)
        save_state(state)

    ctl = mpi = None
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    try:
        with _signals_interrupt():
            ctl = _start_controller(plan, state, deadline, say)
            mpi = _start_engine_job(plan, state, say)
            _wait_for_engines(plan, ctl, mpi, deadline, say)
            _record_running(plan, state, ctl, mpi, t0, say)
            return state
    except BaseException as e:
        say(f"start failed; stopping what was started (logs kept in {plan.pdir / 'log'})",
            stream=sys.stderr)
        _stop_from_state(state, quiet=True)
        for p in (mpi, ctl):
            if p is not None:
                with contextlib.suppress(Exception):
                    p.wait(timeout=1)
        if isinstance(e, _Interrupted):
            raise ClusterError(str(e)) from None
        raise


def _plan_start(n, profile, profile_dir, cluster_id, engines, engine_cmd, hostfile, mpi_args,
                mpirun, controller_args, engine_args, timeout, say) -> _StartPlan:
    """Everything that can be checked before starting anything: programs, hostfile, the
    controller's address, argv and environment."""
    pdir = resolve_profile_dir(profile, profile_dir)
    ctl_argv = controller_program() + profile_args(pdir, cluster_id) + list(controller_args)
    address: Optional[hostmod.ControllerAddress] = None
    entries: List[hostmod.HostEntry] = []
    if hostfile:
        if not Path(hostfile).expanduser().is_file():
            raise ClusterError(f"hostfile {hostfile} does not exist")
        try:
            entries = hostmod.parse_hostfile(hostfile)
            # Ranks on other hosts must reach the controller: its engine-facing address is
            # the one that routes to them (clients stay on loopback), unless the user chose.
            address = hostmod.choose_controller_address(entries, controller_args, pdir)
        except hostmod.HostfileError as e:
            raise ClusterError(str(e)) from None
        ctl_argv += address.args
        say(address.reason)
        if address.warning:
            _say(f"warning: {address.warning}", stream=sys.stderr)
    program = engine_program(engines, engine_cmd) + profile_args(pdir, cluster_id) + list(engine_args)
    env = process_env()
    if not hostfile:
        _local_mpi_env(env, mpi_args)
    mpi_argv = mpirun_command(n, program, mpirun=mpirun, hostfile=hostfile, mpi_args=mpi_args,
                              env=env)
    # what a failed start checks on each host (pxengine --version for pxengine jobs)
    checked = engine_program(engines) if engines == "pxengine" and not engine_cmd else None
    env["IPP_PROFILE_DIR"] = str(pdir)
    env["IPP_CLUSTER_ID"] = cluster_id
    return _StartPlan(n=n, pdir=pdir, cluster_id=cluster_id, spath=state_path(pdir, cluster_id),
                      cfiles=connection_files(pdir, cluster_id), logs=log_paths(pdir, cluster_id),
                      ctl_argv=ctl_argv, mpi_argv=mpi_argv, env=env, hostfile=hostfile,
                      mpi_args=mpi_args, entries=entries, address=address, checked=checked,
                      timeout=timeout)


def _new_state(plan: _StartPlan, profile: Optional[str], profile_dir: Optional[str],
               engine_kind: str) -> dict:
    """The state file's contents before anything runs (status "starting")."""
    return {
        "version": STATE_VERSION,
        "state_file": str(plan.spath),
        "profile_dir": str(plan.pdir),
        "profile": profile or (None if profile_dir else "default"),
        "cluster_id": plan.cluster_id,
        "engine_kind": engine_kind,
        "n": plan.n,
        "hostfile": str(Path(plan.hostfile).expanduser().resolve()) if plan.hostfile else None,
        "controller_address": plan.address.engine_ip if plan.address else None,
        "start_time": time.time(),
        "start_time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "starting",
        "pxcluster": _proc_record(psutil.Process()),
        "controller": None,
        "engines": None,
        "connection_files": {k: str(v) for k, v in plan.cfiles.items()},
        "logs": {k: str(v) for k, v in plan.logs.items()},
    }


def _start_controller(plan: _StartPlan, state: dict, deadline: float, say):
    """1. the controller, recorded, until its connection files answer."""
    logs, cfiles = plan.logs, plan.cfiles
    ctl = _popen(plan.ctl_argv, logs["controller"], plan.env, plan.pdir)
    state["controller"] = dict(_proc_record(psutil.Process(ctl.pid)), argv=plan.ctl_argv,
                               log=str(logs["controller"]))
    save_state(state)
    say(f"controller started (pid {ctl.pid}): {shlex.join(plan.ctl_argv)}")
    while True:
        if ctl.poll() is not None:
            raise ClusterError(
                f"the controller exited with status {ctl.returncode} during start-up; "
                f"log {logs['controller']}:\n{_log_tail(logs['controller'])}")
        if all(p.exists() for p in cfiles.values()) and \
                registered_engines(cfiles["client"], timeout=1.0) is not None:
            return ctl
        if time.monotonic() > deadline:
            raise ClusterError(
                f"the controller did not become ready within {plan.timeout:.0f}s "
                f"(no answering connection files in {plan.pdir / 'security'}); "
                f"log {logs['controller']}:\n{_log_tail(logs['controller'])}")
        time.sleep(0.1)


def _start_engine_job(plan: _StartPlan, state: dict, say):
    """2. the engine job (mpirun), recorded with the environment restart needs."""
    env, logs = plan.env, plan.logs
    if plan.hostfile:
        # connection info for ranks on hosts without this filesystem (rank 0 reads it)
        info = _read_json(plan.cfiles["engine"])
        if info is None:
            raise ClusterError(f"cannot read the engine connection file {plan.cfiles['engine']}")
        env["IPP_CONNECTION_INFO"] = json.dumps(info, separators=(",", ":"))
    mpi = _popen(plan.mpi_argv, logs["engines"], env, plan.pdir)
    state["engines"] = dict(_proc_record(psutil.Process(mpi.pid)), argv=plan.mpi_argv,
                            log=str(logs["engines"]), descendants=[])
    from pxfabric.restart import recorded_env  # what `pxcluster restart` runs it with
    state["engines"]["env"] = recorded_env(env)
    save_state(state)
    say(f"engine job started (mpirun pid {mpi.pid}): {shlex.join(plan.mpi_argv)}")
    return mpi


def _wait_for_engines(plan: _StartPlan, ctl, mpi, deadline: float, say) -> None:
    """3. wait for every rank to register; a failure says which side and why."""
    n, pdir, logs = plan.n, plan.pdir, plan.logs
    have: Dict[int, str] = {}
    last_report = time.monotonic()
    while True:
        got = registered_engines(plan.cfiles["client"], timeout=QUERY_TIMEOUT)
        if got is not None:
            have = got
        if len(have) >= n:
            return
        if mpi.poll() is not None:
            raise ClusterError(
                f"the engine job (mpirun pid {mpi.pid}) exited with status "
                f"{mpi.returncode} after {len(have)} of {n} engines registered; "
                f"logs in {pdir / 'log'}:\n"
                + _host_diagnosis(plan)
                + f"--- {logs['engines']} (last lines):\n{_log_tail(logs['engines'])}")
        if ctl.poll() is not None:
            raise ClusterError(
                f"the controller exited with status {ctl.returncode} while engines "
                f"were registering; logs in {pdir / 'log'}:\n--- {logs['controller']}:\n"
                f"{_log_tail(logs['controller'])}")
        if time.monotonic() > deadline:
            raise ClusterError(
                f"timed out after {plan.timeout:.0f}s: only {len(have)} of {n} engines "
                f"registered. Logs: {logs['engines']} (engines) and "
                f"{logs['controller']} (controller).\n"
                + _host_diagnosis(plan)
                + f"--- {logs['engines']}:\n"
                f"{_log_tail(logs['engines'])}\n--- {logs['controller']}:\n"
                f"{_log_tail(logs['controller'], 10)}")
        if time.monotonic() - last_report > 15:
            say(f"{len(have)} of {n} engines registered ...")
            last_report = time.monotonic()
        time.sleep(0.25)


def _record_running(plan: _StartPlan, state: dict, ctl, mpi, t0: float, say) -> None:
    """4. remember the ranks (and their helpers) by PID, for stop; status "running"."""
    state["engines"]["descendants"] = [
        _proc_record(p) for p in _tree(psutil.Process(mpi.pid))[1:]]
    state["controller"]["descendants"] = [
        _proc_record(p) for p in _tree(psutil.Process(ctl.pid))[1:]]
    state["status"] = "running"
    state["ready_seconds"] = round(time.monotonic() - t0, 2)
    state["hosts"] = engine_hosts(plan.cfiles["client"])
    if state["hosts"] is not None:
        say(f"{plan.n} engines: {hostmod.format_hosts(state['hosts'])}")
    save_state(state)


def start_watcher(state: dict, seconds: float) -> None:
    """``--restart-hung``: start :mod:`pxfabric.watch` for this cluster in its own session and
    record it (``pxcluster stop`` stops it first)."""
    pdir = Path(state["profile_dir"])
    log = pdir / "log" / f"pxwatch-{_tag(state.get('cluster_id') or '')}.log"
    argv = [PYTHON, "-m", "pxfabric.watch", "--profile-dir", str(pdir), "--seconds", f"{seconds:g}"]
    if state.get("cluster_id"):
        argv += ["--cluster-id", state["cluster_id"]]
    proc = _popen(argv, log, process_env(), pdir)
    state["watcher"] = dict(_proc_record(psutil.Process(proc.pid)), argv=argv, log=str(log),
                            seconds=seconds)
    save_state(state)
    _say(f"restarting the engine job by itself when a rank stays stuck {seconds:g} s after an "
         f"interrupt (watcher pid {proc.pid}, log {log})")
