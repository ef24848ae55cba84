"""Shared pieces of the pxfabric benchmarks: clusters, CPU meters, statistics, time limits.

A :class:`Cluster` is one controller (pxcontroller or the stock ipcontroller, same argv) in a
private temporary profile directory plus N engines, with one ``ipyparallel.Client``. The
engines are N stock ``ipyparallel.engine`` processes (``engine_mode="ipengine"``, the
controller benchmark) or ONE MPI job ``mpiexec -n N <engine program>`` (``engine_mode="mpi"``,
the engine benchmark: ``pxengine`` ranks, or stock engines with ``--mpi`` as ipcluster's MPI
launcher starts them). Every process is started here and stopped here by PID (SIGTERM, then
SIGKILL), including descendants found with psutil (the stock controller's scheduler children,
each stock engine's nanny, mpiexec's ranks). Nothing is ever signalled by name.

Run with Debian's interpreter: /usr/bin/python3.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import psutil

PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
from pxfabric import processes as P  # noqa: E402  (stopping by PID, shared with pxcluster and tests)
from pxfabric.cluster import hub  # noqa: E402  (pxf_stats_request)

DEFAULT_PXCONTROLLER = REPO / "build" / "bin" / "pxcontroller"
DEFAULT_PXENGINE = REPO / "build" / "bin" / "pxengine"

# Open MPI as root, more ranks than cores (the machine has 2), idle ranks yielding the CPU.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}
# What every rank of a stock MPI engine job runs: ipcluster's MPIEngineSetLauncher command
# (engine_cmd + ['--mpi']); the engine then asks for engine id = MPI rank.
STOCK_MPI_ENGINE = [PYTHON, "-m", "ipyparallel.engine", "--mpi"]

KINDS = ("px", "stock")
LABEL = {"px": "pxcontroller", "stock": "ipcontroller"}


# ----------------------------------------------------------------------------- time limits

class HardTimeout(Exception):
    pass


_ALL_CLUSTERS: List["Cluster"] = []


def install_time_limit(seconds: float) -> None:
    """SIGALRM after ``seconds`` raises HardTimeout in the main thread (the caller's
    ``finally`` then stops every cluster). A watchdog thread is the backstop if the main
    thread is stuck where a signal cannot reach Python code: 60 s later it SIGKILLs every
    process we started, by PID, and exits with status 3."""

    def on_alarm(signum, frame):
        raise HardTimeout(f"hard timeout of {seconds:.0f}s exceeded")

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(max(1, int(seconds)))

    def watchdog():
        for c in list(_ALL_CLUSTERS):
            try:
                c.kill_all()
            except Exception:
                pass
        sys.stderr.write("bench: watchdog fired; killed our processes, exiting\n")
        sys.stderr.flush()
        os._exit(3)

    t = threading.Timer(seconds + 60, watchdog)
    t.daemon = True
    t.start()


def remaining_alarm() -> float:
    """Seconds left before SIGALRM (peeks by re-arming)."""
    left = signal.alarm(0)
    signal.alarm(left)
    return float(left) if left else 3600.0


# ----------------------------------------------------------------------------- statistics

def median(xs: Iterable[float]) -> Optional[float]:
    xs = list(xs)
    return statistics.median(xs) if xs else None


def summary(xs: Iterable[float]) -> dict:
    s = sorted(xs)
    if not s:
        return {"n": 0}
    med = statistics.median(s)
    return {
        "n": len(s),
        "median": med,
        "min": s[0],
        "max": s[-1],
        "p90": s[min(len(s) - 1, int(0.9 * len(s)))],
        "spread_pct": 100.0 * (s[-1] - s[0]) / med if med else None,
    }


# ----------------------------------------------------------------------------- client

def clear_client_caches(rc) -> None:
    """Identical client-side clean-up for both kinds before every rep: drop the client's local
    caches of results (every AsyncResult of the previous rep has been .get()'d).

    Not rc.wait() + rc.purge_everything(): (1) the stock 7.1 client never removes a
    non-coalescing BroadcastView request's own msg_id from rc.outstanding, so rc.wait()
    without arguments never returns True and purge_local_results('all') raises once a
    broadcast was sent; (2) (historical) pxcontroller once lacked purge_request, and purging
    only the stock hub's records would favour stock. Hub-side records grow on both."""
    rc.outstanding.clear()
    rc._outstanding_dict.clear()
    rc.results.clear()
    rc.metadata.clear()
    rc._futures.clear()
    rc._output_futures.clear()
    rc.history = []
    rc.session.digest_history.clear()


# ----------------------------------------------------------------------------- CPU accounting

def machine_busy_seconds() -> float:
    """Whole-machine CPU seconds spent not idle (all cores), since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def proc_cpu_split(procs: Iterable[psutil.Process]) -> tuple:
    """(user, system) CPU seconds summed over ``procs`` (processes that are gone count 0)."""
    user = system = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            user += t.user
            system += t.system
        except psutil.Error:
            pass
    return user, system


def proc_cpu(procs: Iterable[psutil.Process]) -> float:
    """Sum of user+system CPU seconds of ``procs``."""
    return sum(proc_cpu_split(procs))


class CpuSnapshot:
    """CPU seconds of named process groups plus the whole machine, at one instant."""

    def __init__(self, groups: Dict[str, List[psutil.Process]]):
        self.t = time.perf_counter()
        self.machine = machine_busy_seconds()
        self.split = {name: proc_cpu_split(ps) for name, ps in groups.items()}
        self.groups = {name: sum(us) for name, us in self.split.items()}

    def delta(self, later: "CpuSnapshot") -> dict:
        wall = later.t - self.t
        out = {name: later.groups[name] - self.groups[name] for name in self.groups}
        for name in self.groups:
            out[name + "_user"] = later.split[name][0] - self.split[name][0]
            out[name + "_system"] = later.split[name][1] - self.split[name][1]
        out["machine"] = later.machine - self.machine
        # whatever the machine did that none of our processes did: other users' load
        out["foreign"] = max(0.0, out["machine"] - sum(later.groups[n] - self.groups[n] for n in self.groups))
        out["wall"] = wall
        return out


def machine_load(interval: float = 1.0) -> dict:
    return {
        "ncpu": os.cpu_count(),
        "cpu_busy_pct_1s": psutil.cpu_percent(interval=interval),  # of all cores
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


# ----------------------------------------------------------------------------- clusters

class HarnessError(RuntimeError):
    pass


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log {path}: {e})"


def px_binary(cli_value: Optional[str]) -> str:
    path = cli_value or os.environ.get("PXF_CONTROLLER") or str(DEFAULT_PXCONTROLLER)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise HarnessError(
            f"pxcontroller binary {path} is missing or not executable; build it "
            "(bash scripts/build.sh) or point PXF_CONTROLLER / --px-binary at one")
    return path


def pxengine_binary(cli_value: Optional[str]) -> str:
    path = cli_value or os.environ.get("PXF_PXENGINE") or str(DEFAULT_PXENGINE)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise HarnessError(
            f"pxengine binary {path} is missing or not executable; build it "
            "(bash scripts/build.sh) or point PXF_PXENGINE / --pxengine at one")
    return path


def mpiexec() -> str:
    path = shutil.which("mpiexec")
    if not path:
        raise HarnessError("mpiexec not found on PATH (install openmpi-bin: bash scripts/setup.sh)")
    return path


class Cluster:
    """One controller of ``kind`` ('px' or 'stock') + ``n_engines`` engines + a Client.

    ``engine_mode`` "ipengine": that many stock engine processes. "mpi": one MPI job,
    ``mpiexec -n N <engine_program> --profile-dir=... <engine_args>`` with the Open MPI
    variables of MPI_ENV; for a px controller the job starts only once the engine connection
    file carries "pxf_fabric" (as tests/integration/engine_job.py does)."""

    def __init__(self, kind: str, workdir: Path, n_engines: int, px_path: str,
                 ping_ms: int = 250, px_prefix: str = "", engine_mode: str = "ipengine",
                 engine_program: Optional[List[str]] = None,
                 engine_args: Iterable[str] = (), label: Optional[str] = None) -> None:
        assert kind in KINDS
        assert engine_mode in ("ipengine", "mpi")
        self.kind = kind
        self.label = label or LABEL[kind]  # in messages (e.g. "old pxcontroller" for --against-px)
        self.engine_mode = engine_mode
        self.engine_program = list(engine_program or [])
        self.engine_args = list(engine_args)
        if engine_mode == "mpi" and not self.engine_program:
            raise ValueError("engine_mode='mpi' needs engine_program")
        self.workdir = Path(workdir)
        self.profile_dir = self.workdir / "profile"
        self.security = self.profile_dir / "security"
        self.n_engines = n_engines
        self.ping_ms = ping_ms
        if kind == "px":
            self.program = shlex.split(px_prefix) + [px_path]
        else:
            self.program = [PYTHON, "-m", "ipyparallel.controller"]
        self.env = dict(os.environ)
        if engine_mode == "mpi":
            self.env.update(MPI_ENV)
        self.env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
                        IPYTHONDIR=str(self.workdir / "ipython"))
        self.popens: List[subprocess.Popen] = []
        self.known: Dict[int, psutil.Process] = {}
        self.group_of: Dict[int, str] = {}
        self.controller: Optional[subprocess.Popen] = None
        self.engines: List[subprocess.Popen] = []
        self.controller_log = self.workdir / "controller.log"
        self.client = None
        self.timings: Dict[str, float] = {}
        _ALL_CLUSTERS.append(self)

    # ---- argv (identical for both kinds apart from the program)

    def controller_argv(self) -> List[str]:
        return self.program + [f"--profile-dir={self.profile_dir}", "--ip=127.0.0.1",
                               f"--ping={self.ping_ms}"]

    def engine_argv(self) -> List[str]:
        if self.engine_mode == "mpi":
            return ([mpiexec(), "-n", str(self.n_engines)] + self.engine_program
                    + [f"--profile-dir={self.profile_dir}"] + self.engine_args)
        return [PYTHON, "-m", "ipyparallel.engine", f"--profile-dir={self.profile_dir}"]

    # ---- process bookkeeping

    def _popen(self, argv: List[str], log: Path, group: str) -> subprocess.Popen:
        with open(log, "ab") as out:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 cwd=self.workdir, env=self.env, start_new_session=True)
        self.popens.append(p)
        try:
            self.known[p.pid] = psutil.Process(p.pid)
            self.group_of[p.pid] = group
        except psutil.NoSuchProcess:
            pass
        return p

    def refresh(self) -> None:
        """Remember every current descendant of every process we know (same group)."""
        for pid, proc in list(self.known.items()):
            try:
                kids = proc.children(recursive=True)
            except psutil.Error:
                continue
            for k in kids:
                if k.pid not in self.known:
                    self.known[k.pid] = k
                    self.group_of[k.pid] = self.group_of[pid]

    def group(self, name: str) -> List[psutil.Process]:
        return [p for pid, p in self.known.items() if self.group_of[pid] == name]

    def controller_procs(self) -> List[psutil.Process]:
        return self.group("controller")

    def engine_procs(self) -> List[psutil.Process]:
        return self.group("engine")

    def rank_tree(self, pid: int) -> List[psutil.Process]:
        """The engine process ``pid`` (one MPI rank) and its known descendants (stock: the
        nanny)."""
        root = self.known.get(pid)
        if root is None:
            return []
        try:
            kids = {k.pid for k in root.children(recursive=True)}
        except psutil.Error:
            kids = set()
        return [root] + [p for q, p in self.known.items() if q in kids]
    def all_procs(self) -> List[psutil.Process]:
        return list(self.known.values())

    # ---- start

    def _fail(self, msg: str) -> None:
        raise HarnessError(f"[{self.label}] {msg}\n--- controller log tail:\n"
                           f"{log_tail(self.controller_log)}")

    def start_controller(self, deadline: float) -> None:
        """Launch the controller and wait (until time.monotonic() > deadline) for both
        connection files."""
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()
        self.controller = self._popen(self.controller_argv(), self.controller_log, "controller")
        client_json = self.security / "ipcontroller-client.json"
        engine_json = self.security / "ipcontroller-engine.json"
        # MPI pxengines need the fabric link's address, which pxcontroller adds to its engine file
        fabric = self.kind == "px" and self.engine_mode == "mpi"
        while True:
            if self.controller.poll() is not None:
                self._fail(f"controller exited with {self.controller.returncode} during start-up")
            try:
                einfo = json.loads(engine_json.read_text())
                ok = ("registration" in json.loads(client_json.read_text())
                      and "registration" in einfo and (not fabric or "pxf_fabric" in einfo))
            except (OSError, ValueError):
                ok = False
            if ok:
                break
            if time.monotonic() > deadline:
                self._fail(f"no connection files in {self.security}")
            time.sleep(0.05)
        self.timings["connection_files_s"] = time.perf_counter() - self._t0

    def start_engines(self) -> None:
        if self.engine_mode == "mpi":
            self.engines.append(self._popen(self.engine_argv(), self.workdir / "engines.log", "engine"))
        else:
            for i in range(self.n_engines):
                self.engines.append(self._popen(self.engine_argv(), self.workdir / f"engine-{i}.log",
                                                "engine"))
        self.timings["engines_launched_s"] = time.perf_counter() - self._t0

    def connect(self, deadline: float, poll: float = 0.02) -> None:
        """Client + wait until all engines registered (polled every ``poll`` s), then one
        apply to all of them (``ready_s``); check engine pids; record descendants.

        Timings in ``self.timings``, seconds since the controller was launched."""
        import ipyparallel as ipp

        left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
        self.client = ipp.Client(str(self.security / "ipcontroller-client.json"), timeout=left())
        self.timings["client_connected_s"] = time.perf_counter() - self._t0
        while len(self.client.ids) < self.n_engines:
            dead = [p.pid for p in self.engines if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"exited engine processes: {dead}" if dead else "deadline passed"
                self._fail(f"{len(self.client.ids)} of {self.n_engines} engines registered ({why})"
                           + self._engine_log_tail())
            time.sleep(poll)
        self.timings["all_engines_registered_s"] = time.perf_counter() - self._t0
        try:
            pids = self.client[:].apply_async(os.getpid).get_dict(timeout=left())
        except Exception as e:  # noqa: BLE001
            self._fail(f"{self.n_engines} engines registered but a direct apply to all failed: "
                       f"{e!r}" + self._engine_log_tail())
        self.timings["ready_s"] = time.perf_counter() - self._t0
        self.refresh()  # MPI ranks are mpiexec's children
        ours = {p.pid for p in self.engine_procs()}
        strangers = {eid: pid for eid, pid in pids.items() if pid not in ours}
        if strangers:
            self._fail(f"engines {strangers} are not processes we started")
        self.engine_pid = pids
        time.sleep(0.2)  # let stock engines' nannies appear
        self.refresh()

    def _engine_log_tail(self, lines: int = 20) -> str:
        logs = sorted(self.workdir.glob("engine*.log"))[:2]
        return "".join(f"\n--- {p.name} tail:\n{log_tail(p, lines)}" for p in logs)

    # ---- queries

    def px_stats(self, timeout: float = 5.0) -> Optional[dict]:
        """pxcontroller's own counters (pxf_stats_request on the registration socket)."""
        return hub.controller_stats(self.security / "ipcontroller-client.json", timeout)

    def check_alive(self) -> None:
        """Raise HarnessError (with the log tail) if the controller process has exited."""
        if self.controller is not None and self.controller.poll() is not None:
            rc = self.controller.returncode
            how = f"signal {-rc}" if rc < 0 else f"status {rc}"
            self._fail(f"controller exited ({how}) during the benchmark")

    def controller_log_problems(self, limit: int = 20) -> dict:
        """Lines of the controller log that look like warnings or errors."""
        try:
            lines = self.controller_log.read_text(errors="replace").splitlines()
        except OSError:
            return {"count": 0, "lines": []}
        level = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL|FATAL)\b|Traceback|Segmentation")
        bad = [l for l in lines if level.search(l)]
        return {"count": len(bad), "lines": bad[:limit], "log_lines": len(lines)}

    # ---- stop

    def close_client(self) -> Optional[str]:
        err = None
        if self.client is not None:
            try:
                self.client.close(linger=0)
            except TypeError:
                self.client.close()
            except Exception as e:  # noqa: BLE001
                err = repr(e)
            self.client = None
        return err

    def stop(self, grace: float = 10.0) -> dict:
        return stop_clusters([self], grace)[0]

    def kill_all(self) -> None:
        """Last resort (watchdog): SIGKILL everything we know of, by PID."""
        self.refresh()
        P.send(self.known.values(), signal.SIGKILL)


_alive = alive = P.is_alive
stop_procs = P.stop_procs  # SIGTERM, wait ``grace`` s, SIGKILL; the PIDs that needed SIGKILL


def stop_clusters(clusters: List[Cluster], grace: float = 10.0) -> List[dict]:
    """Stop several clusters at once, by PID: close clients, SIGTERM every known process
    (controller tree, engines, nannies), wait up to ``grace`` s, SIGKILL what is left.

    MPI engine jobs first get SIGTERM on mpiexec alone (it forwards the signal and takes its
    ranks down), up to ``grace / 2`` s, before the round above. One round for all clusters
    (not pxfabric.processes.terminate per cluster): stopping many costs one grace, not many."""
    infos = []
    targets_of = []
    for c in clusters:
        c.refresh()
    launchers = [p for c in clusters if c.engine_mode == "mpi" for p in c.engines
                 if p.poll() is None]
    if launchers:
        ranks = [p for c in clusters if c.engine_mode == "mpi" for p in c.engine_procs() if _alive(p)]
        for p in launchers:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
        P.wait_gone(ranks, grace / 2)
    for c in clusters:
        info: dict = {}
        if c.controller is not None and c.controller.poll() is not None:
            info["controller_had_exited"] = c.controller.returncode  # <0: killed by that signal
        err = c.close_client()
        if err:
            info["client_close_error"] = err
        c.refresh()
        targets = P.alive(c.known.values())
        P.send(targets, signal.SIGTERM)
        info["terminated"] = len(targets)
        infos.append(info)
        targets_of.append(targets)
    still = P.wait_gone([p for t in targets_of for p in t], grace)
    P.send(still, signal.SIGKILL)
    P.wait_gone(still, 5)
    still_pids = {p.pid for p in still}
    for c, info, targets in zip(clusters, infos, targets_of):
        for p in c.popens:
            try:
                p.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        info["needed_sigkill"] = [p.pid for p in targets if p.pid in still_pids]
        info["left_alive"] = [p.pid for p in c.known.values() if _alive(p)]
        if c in _ALL_CLUSTERS:
            _ALL_CLUSTERS.remove(c)
    return infos


def log_problems(path, limit: int = 10, extra_benign: str = "") -> dict:
    """Warnings and errors in a process log: ``{"count", "lines" (the first ``limit``),
    "log_lines"}``. What every stock engine says at start-up with the default configuration
    is not counted, nor lines matching ``extra_benign`` (a regular expression)."""
    import re

    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return {"count": 0, "lines": []}
    level = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL|FATAL)\b|Traceback|Segmentation|"
                       r"\[W |\[E |MPI_ABORT|noticed that process")
    benign = re.compile(r"Not using CurveZMQ security|debugpy_stream undefined"
                        + (f"|{extra_benign}" if extra_benign else ""))
    bad = [l for l in lines if level.search(l) and not benign.search(l)]
    return {"count": len(bad), "lines": bad[:limit], "log_lines": len(lines)}


def binary_info(path: str) -> dict:
    """What a result file records of a binary it measured: path, mtime, size, sha256."""
    import datetime
    import hashlib

    st = os.stat(path)
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    return {"path": path, "mtime": datetime.datetime.fromtimestamp(st.st_mtime).isoformat(),
            "size": st.st_size, "sha256": digest}
