"""Start and stop a controller plus engines for the integration tests.

The same harness drives the stock ``ipcontroller`` and ``pxcontroller``: both get the same
argv, the same private profile directory, and are judged only by what a client can observe.
Engines are stock ``ipengine`` processes or MPI jobs of ``pxengine`` ranks (pxcontroller only).
Every process is started here and stopped here by PID (its descendants too, found with
psutil), never by name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import psutil

PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))
from pxfabric import processes  # noqa: E402  (stopping by PID, shared with pxcluster and bench/)
from pxfabric.cluster import hub  # noqa: E402  (queries to the registration socket)

# $PXF_PXCONTROLLER may point at another build (e.g. a sanitizer build).
PXCONTROLLER = Path(os.environ.get("PXF_PXCONTROLLER") or REPO / "build" / "bin" / "pxcontroller")
# $PXF_PXENGINE likewise for the engine binary.
PXENGINE = Path(os.environ.get("PXF_PXENGINE") or REPO / "build" / "bin" / "pxengine")

CONTROLLER_KINDS = ("pxfabric", "stock")
DEFAULT_CONTROLLERS = "pxfabric,stock"
ENGINE_KINDS = ("ipengine", "mpi")
DEFAULT_ENGINES = "ipengine,mpi"

# Open MPI as root, more ranks than cores, idle ranks yielding the CPU.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}

# Bounds for every wait (the CI machine has 2 cores and is often busy compiling).
CONTROLLER_START_TIMEOUT = 30.0
ENGINE_START_TIMEOUT = 90.0
STOP_TIMEOUT = 10.0

CLIENT_FILE = "ipcontroller-client.json"
ENGINE_FILE = "ipcontroller-engine.json"


class HarnessError(RuntimeError):
    """A cluster could not be started; the message carries the relevant log tails."""


def selected_controllers(env: Optional[str] = None) -> List[str]:
    """Controller kinds chosen by ``$PXF_CONTROLLERS`` (comma list, default both)."""
    raw = os.environ.get("PXF_CONTROLLERS", DEFAULT_CONTROLLERS) if env is None else env
    kinds = [k.strip() for k in raw.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in CONTROLLER_KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"PXF_CONTROLLERS={raw!r}: expected a comma list of {', '.join(CONTROLLER_KINDS)}"
        )
    return list(dict.fromkeys(kinds))


def selected_setups(controllers: Optional[str] = None,
                    engines: Optional[str] = None) -> List[tuple]:
    """(controller kind, engine kind) pairs chosen by ``$PXF_CONTROLLERS`` and ``$PXF_ENGINES``.

    MPI pxengines need pxcontroller's fabric link, so ("stock", "mpi") is never chosen."""
    raw = os.environ.get("PXF_ENGINES", DEFAULT_ENGINES) if engines is None else engines
    kinds = [k.strip() for k in raw.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ENGINE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"PXF_ENGINES={raw!r}: expected a comma list of {', '.join(ENGINE_KINDS)}")
    pairs = [(c, e) for c in selected_controllers(controllers) for e in dict.fromkeys(kinds)
             if not (c == "stock" and e == "mpi")]
    if not pairs:
        raise ValueError("PXF_ENGINES=mpi needs PXF_CONTROLLERS to include pxfabric")
    return pairs


def mpirun() -> str:
    path = shutil.which("mpirun")
    if not path:
        raise HarnessError("mpirun not found on PATH (install openmpi-bin: bash scripts/setup.sh)")
    return path


def controller_command(kind: str) -> List[str]:
    """The program (without arguments) that runs a controller of ``kind``."""
    if kind == "stock":
        return [PYTHON, "-m", "ipyparallel.controller"]
    if kind == "pxfabric":
        if not (PXCONTROLLER.is_file() and os.access(PXCONTROLLER, os.X_OK)):
            raise HarnessError(
                f"PXF_CONTROLLERS selects 'pxfabric' but {PXCONTROLLER} does not exist or is "
                "not executable: build it (bash scripts/build.sh) or run with "
                "PXF_CONTROLLERS=stock"
            )
        return [str(PXCONTROLLER)]
    raise ValueError(f"unknown controller kind {kind!r}")


def controller_args(profile_dir: Path) -> List[str]:
    """Arguments given to every controller kind, identically."""
    return [
        f"--profile-dir={profile_dir}",
        "--ip=127.0.0.1",
        "--ping=250",
        "--log-level=10",
    ]


def engine_command(profile_dir: Path) -> List[str]:
    return [PYTHON, "-m", "ipyparallel.engine", f"--profile-dir={profile_dir}", "--log-level=10"]


def mpi_engine_command(profile_dir: Path, ranks: int) -> List[str]:
    if not (PXENGINE.is_file() and os.access(PXENGINE, os.X_OK)):
        raise HarnessError(f"{PXENGINE} does not exist or is not executable: build it "
                           "(bash scripts/build.sh) or run with PXF_ENGINES=ipengine")
    return [mpirun(), "-n", str(ranks), str(PXENGINE), f"--profile-dir={profile_dir}",
            "--log-level=10"]


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
               what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log {path}: {e})"
    return "\n".join(text[-lines:])


class ProcessTracker:
    """Remembers every process we started and every descendant seen, and stops them by PID.

    Each process belongs to a group ("controller", "engine"); descendants inherit the group of
    the process they were found under. psutil refuses to signal a PID that was reused.
    """

    def __init__(self) -> None:
        self._procs: Dict[int, psutil.Process] = {}
        self._groups: Dict[int, str] = {}
        self._popens: List[subprocess.Popen] = []

    def add_popen(self, popen: subprocess.Popen, group: str) -> None:
        self._popens.append(popen)
        try:
            self._procs[popen.pid] = psutil.Process(popen.pid)
            self._groups[popen.pid] = group
        except psutil.NoSuchProcess:
            pass
        self.refresh()

    def refresh(self) -> None:
        """Record the current descendants of every remembered process."""
        for pid, proc in list(self._procs.items()):
            try:
                children = proc.children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                if child.pid not in self._procs:
                    self._procs[child.pid] = child
                    self._groups[child.pid] = self._groups[pid]

    def adopt_strays(self, marker: str, group: str) -> None:
        """Record processes whose argv contains ``marker`` (a private temp path of ours).

        Catches children a controller forked after our last look and orphaned by its death.
        """
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmdline = proc.info["cmdline"] or []
            except psutil.Error:
                continue
            if proc.pid not in self._procs and any(marker in arg for arg in cmdline):
                self._procs[proc.pid] = proc
                self._groups[proc.pid] = group

    def process(self, pid: int) -> Optional[psutil.Process]:
        self.refresh()
        return self._procs.get(pid)

    def group(self, group: str) -> List[psutil.Process]:
        self.refresh()
        return [p for pid, p in self._procs.items() if self._groups[pid] == group]

    def subtree(self, pid: int) -> List[psutil.Process]:
        """``pid`` and all its recorded descendants (also those already re-parented)."""
        self.refresh()
        root = self._procs.get(pid)
        if root is None:
            return []
        out = [root]
        try:
            live = {c.pid for c in root.children(recursive=True)}
        except psutil.Error:
            live = set()
        out += [p for q, p in self._procs.items() if q in live]
        return out

    @staticmethod
    def alive(procs: Iterable[psutil.Process]) -> List[psutil.Process]:
        return processes.alive(procs)

    def stop(self, procs: Optional[Iterable[psutil.Process]] = None,
             timeout: float = STOP_TIMEOUT) -> List[int]:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the PIDs that needed SIGKILL."""
        self.refresh()
        killed = processes.terminate(self._procs.values() if procs is None else procs, timeout)
        self.reap()
        return killed

    def reap(self) -> None:
        """Collect exit statuses of our direct children so none stays a zombie."""
        for popen in self._popens:
            try:
                popen.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass


class ClientsMixin:
    """Stock clients of a cluster, closed by ``stop()`` at the latest.

    Needs ``self.profile_dir`` and ``self._clients`` (a list)."""

    client_timeout = 20.0
    subscribe_timeout = 10.0
    # After the handshakes, how long the controller may take to apply the subscriptions: 0 for
    # pxcontroller (it reads them as they arrive, before relaying output); stock's relays apply
    # them at their next poll or send, in their own processes.
    subscription_settle = 0.0

    def client(self, timeout: "float | None" = None):
        """A new ``ipyparallel.Client`` for this cluster, whose subscriptions are live.

        The stock client returns from its constructor before its SUB sockets (iopub,
        notification) have connected, and a PUB drops what nobody has subscribed to yet: a
        test that sends a request at once could lose the first output or status of it (seen
        in CI under load: a missing idle status, missing stdout). So this waits until both SUB
        sockets completed their handshake (a socket monitor, set before they connect), after
        which their subscriptions are on the wire ahead of any request."""
        import ipyparallel as ipp

        with _watch_subscriptions() as monitors:
            rc = ipp.Client(profile_dir=str(self.profile_dir), timeout=timeout or self.client_timeout)
        self._clients.append(rc)
        rc._pxf_test_monitors = monitors
        _wait_handshakes(monitors, self.subscribe_timeout)
        if self.subscription_settle:
            time.sleep(self.subscription_settle)
        return rc

    def close_client(self, rc) -> None:
        try:
            rc.close(linger=0)
        except TypeError:
            rc.close()
        except Exception:
            pass
        for monitor in getattr(rc, "_pxf_test_monitors", ()):
            monitor.close(linger=0)
        if rc in self._clients:
            self._clients.remove(rc)


class _watch_subscriptions:
    """While constructing a stock client: a handshake monitor on each SUB socket it connects
    (``ipyparallel.util.connect`` is what the client connects every socket with)."""

    def __enter__(self):
        import zmq
        from ipyparallel import util as ipp_util

        self.util = ipp_util
        self.real_connect = real = ipp_util.connect
        self.monitors = monitors = []

        def connect(socket, url, *args, **kwargs):
            if socket.type == zmq.SUB:
                monitors.append(socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED))
            return real(socket, url, *args, **kwargs)

        ipp_util.connect = connect
        return monitors

    def __exit__(self, *exc):
        self.util.connect = self.real_connect
        if exc[0] is not None:
            for monitor in self.monitors:
                monitor.close(linger=0)
        return False


def _wait_handshakes(monitors, timeout: float) -> None:
    """Until each monitored socket reported a completed handshake, or ``timeout`` s (then the
    client is used as it is: a test of a broken connection sees its own failure)."""
    deadline = time.monotonic() + timeout
    for monitor in monitors:
        left = deadline - time.monotonic()
        if left <= 0 or not monitor.poll(int(left * 1000)):
            return
        monitor.recv_multipart()


def _interactive(f):
    from ipyparallel import interactive

    return interactive(f)


@_interactive
def wait_for_gate(path, limit):
    """Engine-side: mark that we started, then block until ``path`` exists (at most ``limit`` s).

    Shipped with ``apply``; ``interactive`` makes the engine's namespace its globals."""
    import os
    import time

    open(path + ".started", "w").close()
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return "gate timeout"
        time.sleep(0.02)
    return "released"



class Cluster(ClientsMixin):
    """One controller of a given kind in a private profile dir, plus N engines.

    ``engine_kind`` "ipengine": N stock engine processes. "mpi": MPI jobs of pxengine ranks,
    of the sizes in ``jobs`` (default one job of N ranks); the engines of one job live and
    die together (``job_of``)."""

    def __init__(self, kind: str, workdir: Path, n_engines: int = 4,
                 engine_kind: str = "ipengine", jobs: Optional[Iterable[int]] = None,
                 extra_args: Iterable[str] = ()) -> None:
        if engine_kind not in ENGINE_KINDS:
            raise ValueError(f"unknown engine kind {engine_kind!r}")
        self.kind = kind
        self.engine_kind = engine_kind
        if kind == "stock":
            self.subscription_settle = 0.1
        self.extra_args = list(extra_args)  # more controller options, the same for every kind
        self.jobs = list(jobs) if jobs is not None else [n_engines]
        if engine_kind == "mpi" and n_engines and sum(self.jobs) != n_engines:
            raise ValueError(f"job sizes {self.jobs} do not add up to {n_engines} engines")
        self.job_ids: List[List[int]] = []  # engine ids of each MPI job, in start order
        self.workdir = Path(workdir)
        self.profile_dir = self.workdir / "profile"
        self.security_dir = self.profile_dir / "security"
        self.n_engines = n_engines
        self.tracker = ProcessTracker()
        self.controller: Optional[subprocess.Popen] = None
        self.controller_log = self.workdir / "controller.log"
        self.engines: List[subprocess.Popen] = []
        self.engine_logs: List[Path] = []
        self.engine_pids: Dict[int, int] = {}  # engine id -> engine process pid
        self._clients: list = []
        self.env = dict(os.environ)
        if engine_kind == "mpi":
            self.env.update(MPI_ENV)
        self.env.update(
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",
            IPYTHONDIR=str(self.workdir / "ipython"),
        )

    # ---- paths

    @property
    def client_file(self) -> Path:
        return self.security_dir / CLIENT_FILE

    @property
    def engine_file(self) -> Path:
        return self.security_dir / ENGINE_FILE

    def client_info(self) -> dict:
        return json.loads(self.client_file.read_text())

    def engine_info(self) -> dict:
        return json.loads(self.engine_file.read_text())

    # ---- diagnostics

    def logs(self, lines: int = 40) -> str:
        parts = [f"--- controller ({self.kind}) log tail {self.controller_log}:\n"
                 + log_tail(self.controller_log, lines)]
        for path in self.engine_logs:
            parts.append(f"--- engine log tail {path}:\n" + log_tail(path, lines // 2))
        return "\n".join(parts)

    def _fail(self, message: str) -> None:
        raise HarnessError(f"{message}\n{self.logs()}")

    # ---- start-up

    def _popen(self, argv: List[str], log: Path, group: str) -> subprocess.Popen:
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.workdir, env=self.env, start_new_session=True,
            )
        self.tracker.add_popen(popen, group)
        return popen

    def start_controller(self, timeout: float = CONTROLLER_START_TIMEOUT) -> None:
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        argv = controller_command(self.kind) + controller_args(self.profile_dir) + self.extra_args
        self.controller = self._popen(argv, self.controller_log, "controller")

        def ready() -> bool:
            if self.controller.poll() is not None:
                self._fail(f"controller exited with {self.controller.returncode} before "
                           f"writing its connection files (argv {argv})")
            try:
                client, engine = self.client_info(), self.engine_info()
            except (OSError, ValueError):
                return False
            return "registration" in client and "registration" in engine

        deadline = time.monotonic() + timeout
        try:
            wait_until(ready, timeout, 0.1, "both connection files")
        except TimeoutError as e:
            self._fail(f"{e} in {self.security_dir}")
        # The stock controller writes its files before it installs signal handlers and starts
        # serving; a connection_request answered means it is really up.
        if not self.query("connection_request", {}, max(1.0, deadline - time.monotonic())):
            self._fail("controller wrote its connection files but did not answer a "
                       "connection_request")
        self.tracker.refresh()

    def query(self, msg_type: str, content: dict, timeout: float) -> Optional[dict]:
        """Send one signed request to the registration port; the reply, or None on timeout."""
        return hub.request(self.client_file, msg_type, content, timeout)

    def start_engines(self, n: Optional[int] = None,
                      timeout: float = ENGINE_START_TIMEOUT) -> None:
        """Start ``n`` more engines (default: the cluster's) and wait until all registered.

        With MPI engines and no ``n``, one job per entry of ``jobs``, each registered before
        the next starts (so engine ids follow the job order); with ``n``, one job of n ranks."""
        if self.engine_kind == "mpi":
            for size in (self.jobs if n is None else [n]):
                self._start_batch(size, timeout, mpi=True)
        else:
            self._start_batch(self.n_engines if n is None else n, timeout, mpi=False)
        # The stock engine starts a nanny child, mpirun its ranks: record them now.
        self.tracker.refresh()

    def _start_batch(self, n: int, timeout: float, mpi: bool) -> None:
        rc = self.client()
        before = set(rc.ids)
        want = len(before) + n
        first = len(self.engines)
        if mpi:
            log = self.workdir / f"job-{len(self.job_ids)}.log"
            self.engine_logs.append(log)
            self.engines.append(self._popen(mpi_engine_command(self.profile_dir, n), log, "engine"))
        else:
            for i in range(first, first + n):
                log = self.workdir / f"engine-{i}.log"
                self.engine_logs.append(log)
                self.engines.append(self._popen(engine_command(self.profile_dir), log, "engine"))
                time.sleep(0.1)
        new = self.engines[first:]
        try:
            deadline = time.monotonic() + timeout
            while len(rc.ids) < want:
                dead = [p for p in new if p.poll() is not None]
                if dead:
                    self._fail(f"engine(s) {[p.pid for p in dead]} exited during start-up")
                if time.monotonic() > deadline:
                    self._fail(f"only {len(rc.ids)} of {want} engines registered "
                               f"after {timeout:.0f}s")
                time.sleep(0.1)
            if mpi:
                self.job_ids.append(sorted(set(rc.ids) - before))
            self._map_engine_pids(rc)
        finally:
            self.close_client(rc)

    def _map_engine_pids(self, rc) -> None:
        try:
            pids = rc[:].apply_async(os.getpid).get_dict(timeout=60)
        except Exception as e:
            self._fail(f"{len(rc.ids)} engines registered, but a direct apply of os.getpid "
                       f"to all of them failed: {e!r}")
        ours = {p.pid for p in self.engine_processes()}
        for eid, pid in pids.items():
            if pid not in ours:
                self._fail(f"engine {eid} reports pid {pid}, which we did not start")
            self.engine_pids[eid] = pid

    def start(self) -> "Cluster":
        try:
            self.start_controller()
            if self.n_engines:
                self.start_engines()
        except BaseException:
            self.stop()
            raise
        return self

    # ---- clients: see ClientsMixin

    # ---- processes

    def engine_process(self, engine_id: int) -> psutil.Process:
        """The process of engine ``engine_id`` (not its nanny)."""
        return self.tracker.process(self.engine_pids[engine_id])

    def job_of(self, engine_id: int) -> List[int]:
        """The engine ids that share a fate with ``engine_id``: its MPI job, or just itself."""
        for ids in self.job_ids:
            if engine_id in ids:
                return list(ids)
        return [engine_id]

    def engine_subtree(self, engine_id: int) -> List[psutil.Process]:
        """Engine ``engine_id`` and the descendants recorded for it (the stock nanny)."""
        return self.tracker.subtree(self.engine_pids[engine_id])

    def controller_processes(self) -> List[psutil.Process]:
        """The controller and every descendant recorded for it."""
        return self.tracker.group("controller")

    def engine_processes(self) -> List[psutil.Process]:
        """Every engine process and descendant recorded."""
        return self.tracker.group("engine")

    def alive(self, procs: Iterable[psutil.Process]) -> List[psutil.Process]:
        return self.tracker.alive(procs)

    def stop(self) -> List[int]:
        """Close clients, stop everything we started (engines first). Returns SIGKILLed PIDs."""
        for rc in list(self._clients):
            self.close_client(rc)
        # One SIGTERM round for all (engines first), then SIGKILL for whatever is left.
        killed = self.tracker.stop(self.engine_processes() + self.controller_processes())
        self.tracker.adopt_strays(str(self.profile_dir), "stray")
        killed += self.tracker.stop()
        return killed
