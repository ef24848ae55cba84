"""``pxcluster``: start, stop and list pxfabric clusters (a controller plus one MPI job of engines).

A cluster is ``pxcontroller`` plus **one** ``mpirun -n N <engine>`` job, both started in the
background in new sessions, with their output in ``<profile_dir>/log/``. What was started is
recorded in a state file, ``<profile_dir>/security/pxcluster-<cluster_id or "default">.json``,
so that ``pxcluster stop`` and ``pxcluster list`` work from any later shell. Processes are only
ever found and signalled by PID (checked against their start time, so a reused PID is never
touched), together with their descendants and the members of the sessions we created.

Command line (``scripts/pxcluster`` or ``/usr/bin/python3 -m pxfabric``)::

    pxcluster start -n 4 [--profile NAME | --profile-dir DIR] [--cluster-id ID]
                         [--hostfile FILE] [--mpi-args "..."] [--engines pxengine|ipengine]
                         [--restart-hung SECONDS] [--timeout S]
    pxcluster start -n 64 --slurm [--nodes N] [--time T] [--partition P] [--account A]
                         [--qos Q] [--slurm-args "..."] [--slurm-template FILE]
                         [--slurm-launch srun|mpirun]              (see pxfabric.slurm)
    pxcluster stop  [--profile NAME | --profile-dir DIR] [--cluster-id ID] [--all]
    pxcluster restart [--profile NAME | --profile-dir DIR] [--cluster-id ID] [--timeout S]
    pxcluster where [--profile NAME | --profile-dir DIR] [--cluster-id ID] [--timeout S] [--json]
    pxcluster list  [--profile NAME | --profile-dir DIR] [--json]
    pxcluster check --hostfile FILE [--mpi-args "..."] [--timeout S]

With ``--hostfile`` (see ``hostfiles/README.md`` and :mod:`pxfabric.hostfile`) the controller
listens for engines on the address that routes to the hosts, the job gets its connection
info in ``$IPP_CONNECTION_INFO`` (no shared filesystem needed), and a failed start says
which host is at fault.

The same functions are usable from Python: :func:`start_cluster`, :func:`stop_cluster`,
:func:`list_clusters`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import psutil

from pxfabric import __version__, paths
from pxfabric import hostfile as hostmod

PYTHON = "/usr/bin/python3"
# the checkout or the install prefix (pxfabric.paths): PXF_HOME of the batch script
REPO = paths.HOME
PYTHON_DIR = paths.PYTHON_DIR
DEFAULT_CONTROLLER = paths.program("pxcontroller")
DEFAULT_PXENGINE = paths.program("pxengine")
ENGINE_KINDS = ("pxengine", "ipengine")

# Open MPI: allow root, and run more ranks than cores without busy-waiting (2-core machines).
MPI_ENV_DEFAULTS = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}

DEFAULT_TIMEOUT = 120.0     # seconds for the whole start (controller + all engines)
TERM_GRACE = 8.0            # seconds between SIGTERM and SIGKILL in stop
QUERY_TIMEOUT = 2.0         # seconds for one hub query (list, readiness probes)
STATE_VERSION = 1


class ClusterError(RuntimeError):
    """A cluster could not be started, stopped or found; the message says why and where."""


def _say(msg: str, stream=None) -> None:
    print(f"pxcluster: {msg}", file=stream or sys.stdout, flush=True)


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------

def ipython_dir() -> Path:
    """``$IPYTHONDIR`` or ``~/.ipython``, as ``IPython.paths.get_ipython_dir`` resolves it
    (without importing IPython, which costs seconds on a busy machine)."""
    env = os.environ.get("IPYTHONDIR")
    return Path(env or "~/.ipython").expanduser().resolve()


def resolve_profile_dir(profile: Optional[str] = None, profile_dir: Optional[str] = None,
                        create: bool = True) -> Path:
    """``profile_dir`` if given, else ``$IPYTHONDIR/profile_<profile or default>``.

    With ``create`` the directory and its ``security``/``log`` folders are made (0700 for
    ``security``), the way IPython makes profile directories.
    """
    if profile_dir:
        path = Path(profile_dir).expanduser().resolve()
    else:
        path = ipython_dir() / f"profile_{profile or 'default'}"
    if create:
        path.mkdir(parents=True, exist_ok=True)
        (path / "security").mkdir(mode=0o700, exist_ok=True)
        (path / "log").mkdir(exist_ok=True)
    return path


def _tag(cluster_id: str) -> str:
    return cluster_id or "default"


def state_path(profile_dir: Path, cluster_id: str = "") -> Path:
    return Path(profile_dir) / "security" / f"pxcluster-{_tag(cluster_id)}.json"


def connection_files(profile_dir: Path, cluster_id: str = "") -> Dict[str, Path]:
    prefix = f"ipcontroller-{cluster_id}" if cluster_id else "ipcontroller"
    sec = Path(profile_dir) / "security"
    return {kind: sec / f"{prefix}-{kind}.json" for kind in ("client", "engine")}


def log_paths(profile_dir: Path, cluster_id: str = "") -> Dict[str, Path]:
    log = Path(profile_dir) / "log"
    return {
        "controller": log / f"pxcontroller-{_tag(cluster_id)}.log",
        "engines": log / f"pxengines-{_tag(cluster_id)}.log",
    }


def _registry_dir() -> Path:
    """``$IPYTHONDIR/pxcluster/``: one small pointer file per started cluster (for ``list``)."""
    return ipython_dir() / "pxcluster"


def _registry_entry(state_file: Path) -> Path:
    digest = hashlib.sha1(str(state_file).encode()).hexdigest()[:16]
    return _registry_dir() / f"{digest}.json"


# --------------------------------------------------------------------------------------------
# Programs and command lines
# --------------------------------------------------------------------------------------------

def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def controller_program() -> List[str]:
    """``$PXF_CONTROLLER`` (a command line) or ``<repo>/build/bin/pxcontroller``."""
    env = os.environ.get("PXF_CONTROLLER")
    argv = shlex.split(env) if env else [str(DEFAULT_CONTROLLER)]
    exe = shutil.which(argv[0]) if argv else None
    if not exe:
        where = "$PXF_CONTROLLER" if env else "the build tree"
        raise ClusterError(
            f"controller program {argv[0] if argv else env!r} (from {where}) does not exist or "
            "is not executable; build it with `bash scripts/build.sh` or point PXF_CONTROLLER "
            "at a controller"
        )
    return argv


def pxengine_program() -> List[str]:
    """``$PXF_ENGINE`` (a command line) or ``<repo>/build/bin/pxengine``."""
    env = os.environ.get("PXF_ENGINE")
    argv = shlex.split(env) if env else [str(DEFAULT_PXENGINE)]
    if not argv or not shutil.which(argv[0]):
        where = f"$PXF_ENGINE={env!r}" if env else str(DEFAULT_PXENGINE)
        raise ClusterError(
            f"pxengine not found ({where} does not exist or is not executable). Build it with "
            "`bash scripts/build.sh`, or use the stock MPI engines: --engines ipengine"
        )
    return argv


def pxengine_available() -> bool:
    try:
        pxengine_program()
    except ClusterError:
        return False
    return True


def engine_program(kind: str, engine_cmd: Optional[str] = None) -> List[str]:
    """The program each rank runs (without the profile arguments)."""
    if engine_cmd:
        return shlex.split(engine_cmd)
    if kind == "pxengine":
        return pxengine_program()
    if kind == "ipengine":
        return [PYTHON, "-m", "ipyparallel.engine", "--mpi"]
    raise ClusterError(f"unknown engine kind {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")


def profile_args(profile_dir: Path, cluster_id: str) -> List[str]:
    args = [f"--profile-dir={profile_dir}"]
    if cluster_id:
        args.append(f"--cluster-id={cluster_id}")
    return args


def mpirun_command(n: int, program: List[str], *, mpirun: Optional[str] = None,
                   hostfile: Optional[str] = None, mpi_args: Sequence[str] = (),
                   env: Optional[Dict[str, str]] = None) -> List[str]:
    argv = shlex.split(mpirun or os.environ.get("PXF_MPIRUN", "mpirun"))
    if not argv or not shutil.which(argv[0]):
        raise ClusterError(f"MPI launcher {argv[0] if argv else mpirun!r} not found "
                           "(install openmpi-bin, or set PXF_MPIRUN / --mpirun)")
    argv[0] = shutil.which(argv[0])
    argv += ["-n", str(n)]
    if hostfile:
        argv += ["--hostfile", str(Path(hostfile).expanduser().resolve())]
        # remote ranks (rsh/ssh launcher) get only what is exported explicitly: the Python
        # path, the connection info (start_cluster sets it once the controller is up: no
        # shared filesystem needed) and pxfabric's knobs
        exports = ["PYTHONPATH", "PYTHONUNBUFFERED", "IPP_CONNECTION_INFO"]
        exports += sorted(k for k in (os.environ if env is None else env)
                          if k.startswith("PXF_"))
        for name in exports:
            argv += ["-x", name]
    argv += list(mpi_args)
    return argv + program


_SPANS_HOSTS = ("--host", "-host", "-H", "--hostfile", "-hostfile", "--machinefile", "-machinefile",
                "--rankfile", "-rf")


def _local_mpi_env(env: Dict[str, str], mpi_args: Sequence[str]) -> None:
    """A job on this machine only: the ranks talk through shared memory and open no TCP
    listener of their own, and Open MPI's run-time (mpirun's out-of-band channel) stays on
    loopback (docs/security.md). What the user set in the environment or in ``--mpi-args``
    wins."""
    args = " ".join(mpi_args)
    if any(a.split("=")[0] in _SPANS_HOSTS for a in mpi_args):
        return
    if "btl" not in args:
        env.setdefault("OMPI_MCA_btl", "self,vader")
    if "oob_tcp_if" not in args and "OMPI_MCA_oob_tcp_if_exclude" not in env:
        env.setdefault("OMPI_MCA_oob_tcp_if_include", "lo")


def process_env() -> Dict[str, str]:
    """The environment of the controller and the engine job."""
    env = dict(os.environ)
    for k, v in MPI_ENV_DEFAULTS.items():
        env.setdefault(k, v)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PYTHON_DIR) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(PYTHON_DIR)] + paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def _write_json_atomic(path: Path, data: Any, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _profile_lock(profile_dir: Path):
    """Serialise pxcluster's check-then-record steps on one profile (flock on ``security/``)."""
    fd = os.open(str(Path(profile_dir) / "security"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_state(path: Path) -> Optional[dict]:
    state = _read_json(path)
    if state is None or "controller" not in state:
        return None
    return state


def save_state(state: dict) -> None:
    path = Path(state["state_file"])
    _write_json_atomic(path, state)
    with contextlib.suppress(OSError):
        _write_json_atomic(_registry_entry(path), {"state_file": str(path)})


def remove_state(path: Path) -> None:
    _unlink(Path(path))
    with contextlib.suppress(OSError):
        _unlink(_registry_entry(Path(path)))


# --------------------------------------------------------------------------------------------
# Processes (by PID only)
# --------------------------------------------------------------------------------------------

def _proc_record(proc: psutil.Process) -> Dict[str, Any]:
    try:
        return {"pid": proc.pid, "create_time": proc.create_time()}
    except psutil.Error:
        return {"pid": proc.pid, "create_time": None}


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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


def _tree(proc: Optional[psutil.Process]) -> List[psutil.Process]:
    if proc is None:
        return []
    try:
        return [proc] + proc.children(recursive=True)
    except psutil.Error:
        return [proc]


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


def wait_gone(procs: Iterable[psutil.Process], timeout: float) -> List[psutil.Process]:
    """Wait until every process exited (a zombie counts as gone); the ones still alive.

    Not ``psutil.wait_procs``: it waits on each process in turn for up to 1/len(procs) s, and
    on a rank that already exited but is not yet reaped by mpirun, so 9 processes cost ~1 s.
    """
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _is_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


def terminate(procs: Iterable[psutil.Process], grace: float = TERM_GRACE,
              first: Optional[psutil.Process] = None) -> List[int]:
    """SIGTERM (``first`` alone, then the rest), wait, SIGKILL. Returns the PIDs SIGKILLed."""
    targets = [p for p in procs if _is_alive(p)]
    if not targets:
        return []
    if first is not None and first in targets:
        with contextlib.suppress(psutil.Error):
            first.send_signal(signal.SIGTERM)
        # give mpirun a moment to forward the signal and take its ranks down itself
        targets = wait_gone(targets, grace / 2)
    for p in targets:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    still = wait_gone(targets, grace)
    killed = []
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
            killed.append(p.pid)
    wait_gone(still, 5)
    return killed


# --------------------------------------------------------------------------------------------
# Hub queries
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def hub_connection(client_file: Path):
    """``(session, socket)``: a DEALER connected to the controller's registration socket of a
    client connection file (Curve-aware, ``*`` dialled as 127.0.0.1), or ``None`` when the file
    is missing or incomplete. Closed on exit."""
    info = _read_json(Path(client_file))
    if not info or "registration" not in info:
        yield None
        return
    import zmq
    from jupyter_client.session import Session

    session = Session(key=info.get("key", "").encode(),
                      signature_scheme=info.get("signature_scheme", "hmac-sha256"))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        if info.get("curve_serverkey"):  # --curve: the controller's key and a keypair of ours
            sock.curve_serverkey = info["curve_serverkey"].encode()
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        interface = info["interface"]
        if interface.endswith("://*") or interface.endswith("://0.0.0.0"):
            interface = interface.rsplit("://", 1)[0] + "://127.0.0.1"
        sock.connect(f"{interface}:{info['registration']}")
        yield session, sock
    finally:
        sock.close()
        ctx.term()


def query_hub(client_file: Path, msg_type: str = "connection_request",
              content: Optional[dict] = None, timeout: float = QUERY_TIMEOUT) -> Optional[dict]:
    """One signed request to the controller's registration socket; the reply or None."""
    try:
        with hub_connection(client_file) as conn:
            if conn is None:
                return None
            session, sock = conn
            session.send(sock, msg_type, content or {})
            if not sock.poll(int(timeout * 1000)):
                return None
            _, frames = session.feed_identities(sock.recv_multipart())
            return session.deserialize(frames)
    except Exception:
        return None


def registered_engines(client_file: Path, timeout: float = QUERY_TIMEOUT) -> Optional[Dict[int, str]]:
    """``{engine id: uuid}`` of the engines registered, or None if the hub did not answer."""
    reply = query_hub(client_file, "connection_request", {}, timeout)
    if not reply or reply.get("content", {}).get("status") != "ok":
        return None
    engines = reply["content"].get("engines") or {}
    return {int(k): v for k, v in engines.items()}


def engine_hosts(client_file: Path, timeout: float = QUERY_TIMEOUT) -> Optional[List[dict]]:
    """Where the registered engines run (``pxf_engines_request``), grouped by host:
    ``[{"host": "nodeA", "engines": [0, 1], "ranks": [0, 1]}, ...]``, or None if the hub did
    not answer."""
    reply = query_hub(client_file, "pxf_engines_request", {}, timeout)
    if not reply or reply.get("content", {}).get("status") != "ok":
        return None
    return hostmod.group_hosts(reply["content"].get("engines") or {})


# --------------------------------------------------------------------------------------------
# start
# --------------------------------------------------------------------------------------------

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


def _host_diagnosis(entries, plan, mpi_args, cfiles, logs, env, engine_argv) -> str:
    """For a failed start: the ranks' own errors and the hosts checked (hostfile.py)."""
    return hostmod.diagnose_failed_start(
        entries, plan, mpi_args=mpi_args, engine_info=_read_json(cfiles["engine"]) or {},
        engine_log=logs["engines"], env=env, engine_argv=engine_argv)


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
    say = (lambda m: None) if quiet else _say
    pdir = resolve_profile_dir(profile, profile_dir)
    cluster_id = cluster_id or ""
    spath = state_path(pdir, cluster_id)
    cfiles = connection_files(pdir, cluster_id)
    logs = log_paths(pdir, cluster_id)

    # Everything that can be checked before starting anything.
    ctl_argv = controller_program() + profile_args(pdir, cluster_id) + list(controller_args)
    plan: Optional[hostmod.ControllerAddress] = None
    entries: List[hostmod.HostEntry] = []
    if hostfile:
        if not Path(hostfile).expanduser().is_file():
            raise ClusterError(f"hostfile {hostfile} does not exist")
        try:
            entries = hostmod.parse_hostfile(hostfile)
            # Ranks on other hosts must reach the controller: its engine-facing address is
            # the one that routes to them (clients stay on loopback), unless the user chose.
            plan = hostmod.choose_controller_address(entries, controller_args, pdir)
        except hostmod.HostfileError as e:
            raise ClusterError(str(e)) from None
        ctl_argv += plan.args
        say(plan.reason)
        if plan.warning:
            _say(f"warning: {plan.warning}", stream=sys.stderr)
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

    with _profile_lock(pdir):
        _refuse_running(spath, cfiles, say)
        state = {
            "version": STATE_VERSION,
            "state_file": str(spath),
            "profile_dir": str(pdir),
            "profile": profile or (None if profile_dir else "default"),
            "cluster_id": cluster_id,
            "engine_kind": "custom" if engine_cmd else engines,
            "n": n,
            "hostfile": str(Path(hostfile).expanduser().resolve()) if hostfile else None,
            "controller_address": plan.engine_ip if plan else None,
            "start_time": time.time(),
            "start_time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": "starting",
            "pxcluster": _proc_record(psutil.Process()),
            "controller": None,
            "engines": None,
            "connection_files": {k: str(v) for k, v in cfiles.items()},
            "logs": {k: str(v) for k, v in logs.items()},
        }
        save_state(state)

    ctl = mpi = None
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    try:
        with _signals_interrupt():
            # 1. the controller
            ctl = _popen(ctl_argv, logs["controller"], env, pdir)
            state["controller"] = dict(_proc_record(psutil.Process(ctl.pid)), argv=ctl_argv,
                                       log=str(logs["controller"]))
            save_state(state)
            say(f"controller started (pid {ctl.pid}): {shlex.join(ctl_argv)}")
            while True:
                if ctl.poll() is not None:
                    raise ClusterError(
                        f"the controller exited with status {ctl.returncode} during start-up; "
                        f"log {logs['controller']}:\n{_log_tail(logs['controller'])}")
                if all(p.exists() for p in cfiles.values()) and \
                        registered_engines(cfiles["client"], timeout=1.0) is not None:
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"the controller did not become ready within {timeout:.0f}s "
                        f"(no answering connection files in {pdir / 'security'}); "
                        f"log {logs['controller']}:\n{_log_tail(logs['controller'])}")
                time.sleep(0.1)

            # 2. the engine job
            if hostfile:
                # connection info for ranks on hosts without this filesystem (rank 0 reads it)
                info = _read_json(cfiles["engine"])
                if info is None:
                    raise ClusterError(f"cannot read the engine connection file {cfiles['engine']}")
                env["IPP_CONNECTION_INFO"] = json.dumps(info, separators=(",", ":"))
            mpi = _popen(mpi_argv, logs["engines"], env, pdir)
            state["engines"] = dict(_proc_record(psutil.Process(mpi.pid)), argv=mpi_argv,
                                    log=str(logs["engines"]), descendants=[])
            from pxfabric.restart import recorded_env  # what `pxcluster restart` runs it with
            state["engines"]["env"] = recorded_env(env)
            save_state(state)
            say(f"engine job started (mpirun pid {mpi.pid}): {shlex.join(mpi_argv)}")

            # 3. wait for every rank to register
            have: Dict[int, str] = {}
            last_report = time.monotonic()
            while True:
                got = registered_engines(cfiles["client"], timeout=QUERY_TIMEOUT)
                if got is not None:
                    have = got
                if len(have) >= n:
                    break
                if mpi.poll() is not None:
                    raise ClusterError(
                        f"the engine job (mpirun pid {mpi.pid}) exited with status "
                        f"{mpi.returncode} after {len(have)} of {n} engines registered; "
                        f"logs in {pdir / 'log'}:\n"
                        + _host_diagnosis(entries, plan, mpi_args, cfiles, logs, env, checked)
                        + f"--- {logs['engines']} (last lines):\n{_log_tail(logs['engines'])}")
                if ctl.poll() is not None:
                    raise ClusterError(
                        f"the controller exited with status {ctl.returncode} while engines "
                        f"were registering; logs in {pdir / 'log'}:\n--- {logs['controller']}:\n"
                        f"{_log_tail(logs['controller'])}")
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"timed out after {timeout:.0f}s: only {len(have)} of {n} engines "
                        f"registered. Logs: {logs['engines']} (engines) and "
                        f"{logs['controller']} (controller).\n"
                        + _host_diagnosis(entries, plan, mpi_args, cfiles, logs, env, checked)
                        + f"--- {logs['engines']}:\n"
                        f"{_log_tail(logs['engines'])}\n--- {logs['controller']}:\n"
                        f"{_log_tail(logs['controller'], 10)}")
                if time.monotonic() - last_report > 15:
                    say(f"{len(have)} of {n} engines registered ...")
                    last_report = time.monotonic()
                time.sleep(0.25)

            # 4. remember the ranks (and their helpers) by PID, for stop
            state["engines"]["descendants"] = [
                _proc_record(p) for p in _tree(psutil.Process(mpi.pid))[1:]]
            state["controller"]["descendants"] = [
                _proc_record(p) for p in _tree(psutil.Process(ctl.pid))[1:]]
            state["status"] = "running"
            state["ready_seconds"] = round(time.monotonic() - t0, 2)
            state["hosts"] = engine_hosts(cfiles["client"])
            if state["hosts"] is not None:
                say(f"{n} engines: {hostmod.format_hosts(state['hosts'])}")
            save_state(state)
            return state
    except BaseException as e:
        say(f"start failed; stopping what was started (logs kept in {pdir / 'log'})",
            stream=sys.stderr)
        _stop_from_state(state, quiet=True)
        for p in (mpi, ctl):
            if p is not None:
                with contextlib.suppress(Exception):
                    p.wait(timeout=1)
        if isinstance(e, _Interrupted):
            raise ClusterError(str(e)) from None
        raise


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


def _selector_args(state: dict) -> str:
    parts = []
    if state.get("profile"):
        parts.append(f"--profile {shlex.quote(state['profile'])}")
    else:
        parts.append(f"--profile-dir {shlex.quote(state['profile_dir'])}")
    if state.get("cluster_id"):
        parts.append(f"--cluster-id {shlex.quote(state['cluster_id'])}")
    return " ".join(parts)


def connect_hint(state: dict) -> str:
    kw = []
    if state.get("profile"):
        kw.append(f"profile={state['profile']!r}")
    else:
        kw.append(f"profile_dir={state['profile_dir']!r}")
    if state.get("cluster_id"):
        kw.append(f"cluster_id={state['cluster_id']!r}")
    return ("    import ipyparallel as ipp\n"
            f"    rc = ipp.Client({', '.join(kw)})")


# --------------------------------------------------------------------------------------------
# stop
# --------------------------------------------------------------------------------------------

def _stop_from_state(state: dict, quiet: bool = False, grace: float = TERM_GRACE) -> dict:
    """Stop every process of a recorded cluster, then remove its files. Returns a summary."""
    if state.get("slurm"):
        from pxfabric import slurm
        return slurm.stop_slurm(state, quiet=quiet)
    say = (lambda m: None) if quiet else _say
    summary: Dict[str, Any] = {"killed": [], "left": []}
    watcher = _process(state.get("watcher"))
    if watcher is not None:  # first: it must not restart the job we are stopping
        summary["killed"] += terminate([watcher], grace=3.0)
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


# --------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _add_selector(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--profile", metavar="NAME",
                   help="IPython profile: $IPYTHONDIR/profile_NAME (default: default)")
    g.add_argument("--profile-dir", metavar="DIR", help="profile directory (overrides --profile)")


class _VersionAction(argparse.Action):
    """``--version``: the project version and which pxfabric this is (checkout or install
    prefix), on one line (argparse's own version action wraps it at 80 columns)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0,
                         help="print the version and where this pxfabric is, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"pxcluster {__version__} ({paths.describe()})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pxcluster",
        description="Start, stop and list pxfabric clusters: pxcontroller plus one MPI job "
                    "of engines, driven with the stock ipyparallel client.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command",
                                metavar="{start,stop,restart,where,list,check,connect,disconnect}")
    sub.required = True

    s = sub.add_parser("start", help="start a controller and one MPI job of N engines")
    s.add_argument("-n", "--n", type=int, required=True, metavar="N", help="number of MPI ranks")
    _add_selector(s)
    s.add_argument("--cluster-id", default="", metavar="ID",
                   help="cluster id: files ipcontroller-ID-{client,engine}.json")
    s.add_argument("--engines", choices=ENGINE_KINDS, default="pxengine",
                   help="pxengine (build/bin/pxengine, default) or ipengine (stock "
                        "`python3 -m ipyparallel.engine --mpi` on every rank)")
    s.add_argument("--engine-cmd", metavar="CMD", default=None,
                   help="run CMD on every rank instead (profile arguments are appended)")
    s.add_argument("--hostfile", metavar="FILE", help="mpirun --hostfile FILE")
    s.add_argument("--mpi-args", default="", metavar="ARGS",
                   help='extra mpirun arguments, e.g. "--bind-to none"')
    s.add_argument("--mpirun", default=None, metavar="CMD",
                   help="MPI launcher (default $PXF_MPIRUN or mpirun)")
    s.add_argument("--controller-args", default="", metavar="ARGS",
                   help='extra pxcontroller arguments, e.g. "--ping 1000 --log-level 10"')
    s.add_argument("--engine-args", default="", metavar="ARGS",
                   help="extra arguments for every rank's engine")
    s.add_argument("--restart-hung", type=float, default=None, metavar="SECONDS",
                   help="restart the engine job by itself (same ids, controller and clients "
                        "kept) when a rank stays stuck SECONDS after an interrupt")
    s.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds to wait for all engines (default {DEFAULT_TIMEOUT:.0f})")

    b = s.add_argument_group(
        "Slurm", "--slurm submits the whole cluster as one batch job (slurm/pxfabric.sbatch: "
        "the controller on the job's first node, the engines over the allocation)")
    b.add_argument("--slurm", action="store_true", help="run the cluster as a Slurm batch job")
    b.add_argument("--nodes", "-N", metavar="N", help="sbatch --nodes")
    b.add_argument("--time", "-t", dest="timelimit", metavar="TIME",
                   help="sbatch --time (walltime: MINUTES, HH:MM:SS, D-HH:MM ...)")
    b.add_argument("--partition", "-p", metavar="NAME", help="sbatch --partition")
    b.add_argument("--account", "-A", metavar="NAME", help="sbatch --account")
    b.add_argument("--qos", metavar="NAME", help="sbatch --qos")
    b.add_argument("--slurm-args", default="", metavar="ARGS",
                   help='more sbatch options, e.g. "--constraint=cpu --exclusive"')
    b.add_argument("--slurm-template", metavar="FILE",
                   help="batch script template ({n} {queue} {account} {timelimit} {nodes} "
                        "... as ipyparallel's Slurm launcher; default "
                        "slurm/pxcluster.sbatch.template)")
    b.add_argument("--slurm-launch", choices=("srun", "mpirun"), default=None,
                   help="how the job starts its ranks (default: srun --mpi=pmix when the "
                        "site's srun offers it, else mpirun)")

    r = sub.add_parser(
        "restart", help="end the engine job and start it again with the same engine ids, "
                        "keeping the controller, its task records and the connected clients",
        description="For a cell that hangs (a rank stuck in a collective): stop the MPI job "
                    "(SIGTERM, SIGKILL after a grace period), wait until the controller has "
                    "unregistered its engines (their outstanding work fails with EngineError), "
                    "and run the same mpirun command again; the new ranks get ids 0..N-1 and "
                    "connected clients keep working. Not for Slurm clusters yet.")
    _add_selector(r)
    r.add_argument("--cluster-id", default="", metavar="ID")
    r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds to wait for the new engines (default {DEFAULT_TIMEOUT:.0f})")

    t = sub.add_parser("stop", help="stop a cluster started by pxcluster start")
    _add_selector(t)
    t.add_argument("--cluster-id", default="", metavar="ID")
    t.add_argument("--all", action="store_true", help="stop every cluster `pxcluster list` shows")

    w = sub.add_parser(
        "where", help="every rank's current state and Python stack (a cell that hangs: which "
                      "rank is stuck where)",
        description="Ask every engine, on the control channel, what it runs and where its main "
                    "thread is; ranks in the same state are shown together. Answered by each "
                    "rank's watch thread, so ranks stuck in MPI answer too; engines that do not "
                    "answer within --timeout are named (stock ipengines never answer).")
    _add_selector(w)
    w.add_argument("--cluster-id", default="", metavar="ID")
    w.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for the answers (default 5)")
    w.add_argument("--json", action="store_true", help="machine-readable output")

    ls = sub.add_parser("list", help="show clusters started by pxcluster")
    _add_selector(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    c = sub.add_parser(
        "check", help="pre-flight check of a hostfile's hosts (ssh, pxengine, Python, the "
                      "controller's address)",
        description="Log in to every host of the hostfile with the agent mpirun will use "
                    "(BatchMode, 5 s connect timeout), run `pxengine --version` and the Python "
                    "imports there, and connect back to the address the controller would "
                    "listen on. One line per host; exit status 0 only if every host is OK.")
    c.add_argument("--hostfile", required=True, metavar="FILE", help="Open MPI hostfile")
    c.add_argument("--mpi-args", default="", metavar="ARGS",
                   help="the mpirun arguments of the start (for --mca plm_rsh_agent, --prefix)")
    c.add_argument("--controller-args", default="", metavar="ARGS",
                   help="the controller arguments of the start (--ip/--engine-ip), "
                        "e.g. --controller-args=--engine-ip=10.0.0.1")
    c.add_argument("--engines", choices=ENGINE_KINDS, default="pxengine",
                   help="what the ranks run (ipengine: no pxengine step)")
    _add_selector(c)
    c.add_argument("--timeout", type=float, default=hostmod.DEFAULT_CHECK_TIMEOUT, metavar="S",
                   help=f"seconds per host (default {hostmod.DEFAULT_CHECK_TIMEOUT:.0f}); hosts "
                        "are checked in parallel")
    _add_tunnel_parsers(sub)
    return parser


def _add_tunnel_parsers(sub) -> None:
    """``connect``/``disconnect`` (python/pxfabric/connect.py: pxtunnel, one SSH session)."""
    k = sub.add_parser("connect", help="forward a remote controller's ports through one SSH "
                                       "session (pxtunnel) and write a local profile for them")
    k.add_argument("target", metavar="[user@]host")
    k.add_argument("--remote-profile-dir", metavar="DIR",
                   help="the controller's profile dir on the host (default "
                        "~/.ipython/profile_default)")
    k.add_argument("--remote-file", metavar="PATH", help="the client connection file on the host")
    k.add_argument("--cluster-id", default="", metavar="ID")
    k.add_argument("--jump", "-J", metavar="HOST", help="jump host (as ssh -J / ProxyJump)")
    k.add_argument("--as", dest="name", metavar="NAME",
                   help="local profile name (default: the host)")
    k.add_argument("-F", dest="ssh_config", metavar="CONFIG", help="ssh config file")
    k.add_argument("-i", dest="identity", metavar="KEY", help="identity (private key) file")
    k.add_argument("-p", dest="port", type=int, default=0, metavar="PORT", help="ssh port")
    k.add_argument("--known-hosts", metavar="FILE", help="known_hosts file to check/record in")
    k.add_argument("--accept-new-host-key", action="store_true",
                   help="record an unknown host key (a changed one is always refused)")
    k.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for the tunnel (default 30)")
    d = sub.add_parser("disconnect", help="stop the tunnel of `pxcluster connect`")
    d.add_argument("name", metavar="NAME", help="the local profile name (host or --as NAME)")
    d.add_argument("--cluster-id", default="", metavar="ID")


def _tunnel_main(args) -> int:
    from pxfabric import connect as tunnel
    if args.command == "connect":
        state = tunnel.connect(
            args.target, name=args.name, remote_profile_dir=args.remote_profile_dir,
            remote_file=args.remote_file, cluster_id=args.cluster_id, jump=args.jump,
            ssh_config=args.ssh_config, identity=args.identity, port=args.port,
            accept_new_host_key=args.accept_new_host_key, known_hosts=args.known_hosts,
            timeout=args.timeout)
        print(f"Connect with: {tunnel.connect_hint(state)}")
        print(f"Stop with: pxcluster disconnect {shlex.quote(state['name'])}"
              + (f" --cluster-id {shlex.quote(state['cluster_id'])}" if state['cluster_id']
                 else ""), flush=True)
        return 0
    summary = tunnel.disconnect(args.name, args.cluster_id)
    how = ("not running" if not summary["was_running"] else
           "killed (SIGKILL)" if summary["killed"] else "stopped")
    _say(f"tunnel '{args.name}' (pxtunnel pid {summary['pid']}) {how}"
         + ("; removed its stale local connection file" if summary["removed_file"] else ""))
    return 0


# Options whose value is a command line of its own: `--mpi-args "--bind-to none"` must not be
# read as an option (argparse refuses a value that starts with "-" unless written OPT=VALUE).
_COMMAND_LINE_OPTIONS = ("--mpi-args", "--controller-args", "--engine-args", "--slurm-args",
                         "--mpirun", "--engine-cmd")


def _glue_command_line_options(argv: Sequence[str]) -> List[str]:
    out: List[str] = []
    it = iter(argv)
    for a in it:
        if a in _COMMAND_LINE_OPTIONS:
            value = next(it, None)
            out.append(a if value is None else f"{a}={value}")
        else:
            out.append(a)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(_glue_command_line_options(argv))
    try:
        if args.command in ("connect", "disconnect"):
            return _tunnel_main(args)
        if args.command == "start" and args.slurm:
            from pxfabric import slurm
            if args.restart_hung:
                raise ClusterError("--restart-hung is not available with --slurm yet (the "
                                   "controller lives in the batch job)")
            if args.hostfile or args.engines != "pxengine" or args.engine_cmd or args.mpirun:
                raise ClusterError("--slurm runs pxengine over the job's allocation: "
                                   "--hostfile, --engines, --engine-cmd and --mpirun do not "
                                   "apply (use --slurm-launch, --mpi-args, --slurm-args)")
            state = slurm.start_slurm_cluster(
                args.n, profile=args.profile, profile_dir=args.profile_dir,
                cluster_id=args.cluster_id, nodes=args.nodes, timelimit=args.timelimit,
                queue=args.partition, account=args.account, qos=args.qos,
                slurm_args=shlex.split(args.slurm_args), template=args.slurm_template,
                launch=args.slurm_launch, controller_args=shlex.split(args.controller_args),
                engine_args=shlex.split(args.engine_args), mpi_args=shlex.split(args.mpi_args),
                timeout=args.timeout)
            print("Connect with:\n" + connect_hint(state))
            cid = f" --cluster-id {shlex.quote(state['cluster_id'])}" if state["cluster_id"] else ""
            print(f"From a laptop:\n    pxcluster connect {socket.getfqdn()} --remote-profile-dir "
                  f"{shlex.quote(state['profile_dir'])}{cid}")
            print(f"Stop with:\n    pxcluster stop {_selector_args(state)}   "
                  f"(scancel {state['slurm']['job_id']})", flush=True)
            return 0
        if args.command == "start":
            if any(getattr(args, k) for k in ("nodes", "timelimit", "partition", "account",
                                               "qos", "slurm_args", "slurm_template",
                                               "slurm_launch")):
                raise ClusterError("--nodes, --time, --partition, --account, --qos and the "
                                   "--slurm-* options need --slurm")
            if args.restart_hung is not None and args.restart_hung <= 0:
                raise ClusterError(f"--restart-hung must be a positive number of seconds "
                                   f"(got {args.restart_hung:g})")
            state = start_cluster(
                args.n, profile=args.profile, profile_dir=args.profile_dir,
                cluster_id=args.cluster_id, engines=args.engines, engine_cmd=args.engine_cmd,
                hostfile=args.hostfile, mpi_args=shlex.split(args.mpi_args), mpirun=args.mpirun,
                controller_args=shlex.split(args.controller_args),
                engine_args=shlex.split(args.engine_args), timeout=args.timeout)
            _say(f"{state['n']} engines ({state['engine_kind']}) registered in "
                 f"{state['ready_seconds']:.1f}s; profile dir {state['profile_dir']}, "
                 f"cluster id {state['cluster_id'] or '(none)'}")
            _say(f"logs in {Path(state['profile_dir']) / 'log'}; state {state['state_file']}")
            if args.restart_hung:
                start_watcher(state, args.restart_hung)
            print("Connect with:\n" + connect_hint(state))
            print(f"Stop with:\n    pxcluster stop {_selector_args(state)}", flush=True)
            return 0
        if args.command == "stop":
            if args.all:
                rows = list_clusters([resolve_profile_dir(args.profile, args.profile_dir,
                                                          create=False)]
                                     if (args.profile or args.profile_dir) else [])
                if not rows:
                    _say("no clusters to stop")
                failed = 0
                for r in rows:
                    state = load_state(Path(r["state_file"]))
                    if state is None:
                        continue
                    _say(f"stopping {r['profile_dir']} (cluster id {r['cluster_id'] or '(none)'})")
                    if _stop_from_state(state)["left"]:
                        failed += 1
                return 1 if failed else 0
            summary = stop_cluster(args.profile, args.profile_dir, args.cluster_id)
            _say("stopped; no process left" + (
                f"; removed {', '.join(summary['removed'])}" if summary["removed"] else ""))
            return 0
        if args.command == "restart":
            from pxfabric.restart import restart_cluster
            restart_cluster(args.profile, args.profile_dir, args.cluster_id, timeout=args.timeout)
            return 0
        if args.command == "check":
            try:
                checks = check_hostfile(
                    args.hostfile, mpi_args=shlex.split(args.mpi_args),
                    controller_args=shlex.split(args.controller_args), engines=args.engines,
                    profile=args.profile, profile_dir=args.profile_dir, timeout=args.timeout)
            except hostmod.HostfileError as e:
                raise ClusterError(str(e)) from None
            for chk in checks:
                print(chk.line(), flush=True)
            bad = [chk.host for chk in checks if not chk.ok]
            if bad:
                _say(f"{len(bad)} of {len(checks)} hosts not ready: {', '.join(bad)}",
                     stream=sys.stderr)
                return 1
            _say(f"all {len(checks)} hosts ready")
            return 0
        if args.command == "where":
            from pxfabric import where as wheremod
            states = wheremod.where(args.profile, args.profile_dir, args.cluster_id,
                                    timeout=args.timeout)
            print(json.dumps({str(k): v for k, v in sorted(states.items())}, indent=2)
                  if args.json else wheremod.format_states(states), flush=True)
            return 0
        if args.command == "list":
            dirs = []
            if args.profile or args.profile_dir:
                dirs.append(resolve_profile_dir(args.profile, args.profile_dir, create=False))
            rows = list_clusters(dirs)
            if dirs:
                rows = [r for r in rows if Path(r["profile_dir"]) == dirs[0]]
            print(json.dumps(rows, indent=2) if args.json else format_list(rows))
            if not args.json:
                from pxfabric import connect as tunnel
                trows = tunnel.list_tunnels()
                if trows:
                    print(tunnel.format_tunnels(trows))
            return 0
    except ClusterError as e:
        _say(f"error: {e}", stream=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _say("interrupted", stream=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
