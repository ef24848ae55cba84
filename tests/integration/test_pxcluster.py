"""``pxcluster`` start/list/stop and the ipyparallel launchers, against real processes.

Every cluster lives in a private IPYTHONDIR/profile dir under ``tmp_path``. Each test records
the PIDs it learns about (from the state file and psutil trees) and its teardown stops any
survivor by PID -- after asserting there were none. Nothing here matches processes by name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import psutil
import pytest
from ipyparallel import interactive

PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[2]
PXCLUSTER = REPO / "scripts" / "pxcluster"
PXENGINE = REPO / "build" / "bin" / "pxengine"
PXCONTROLLER = REPO / "build" / "bin" / "pxcontroller"

sys.path.insert(0, str(REPO / "python"))

START_TIMEOUT = 180  # seconds pxcluster may wait for engines (2 busy cores)
CLI_TIMEOUT = START_TIMEOUT + 60

needs_controller = pytest.mark.skipif(
    not os.access(PXCONTROLLER, os.X_OK),
    reason=f"{PXCONTROLLER} not built (bash scripts/build.sh)")

ENGINE_KINDS = [
    "ipengine",
    pytest.param("pxengine", marks=pytest.mark.skipif(
        not os.access(PXENGINE, os.X_OK),
        reason=f"{PXENGINE} is not built yet (the engine issue); the pxengine path of "
               "pxcluster is exercised as soon as it exists")),
]

pytestmark = [needs_controller]


# ---------------------------------------------------------------------------------- helpers

@interactive
def rank_info():
    """(pid, rank, size) on an engine; @interactive: its globals are the engine's namespace."""
    import os
    from mpi4py import MPI

    return os.getpid(), MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size


class Procs:
    """PIDs (with start times) seen during a test; teardown stops survivors by PID."""

    def __init__(self) -> None:
        self.seen: Dict[int, float] = {}

    def add(self, pid: int, create_time: Optional[float] = None) -> None:
        try:
            proc = psutil.Process(pid)
            ct = proc.create_time()
        except psutil.Error:
            return
        if create_time is not None and abs(ct - create_time) > 1.0:
            return  # reused PID: not ours
        self.seen.setdefault(pid, ct)

    def add_tree(self, pid: int, create_time: Optional[float] = None) -> None:
        self.add(pid, create_time)
        if pid not in self.seen:
            return
        try:
            for child in psutil.Process(pid).children(recursive=True):
                self.add(child.pid)
        except psutil.Error:
            pass

    def add_state(self, state: dict) -> None:
        for group in ("controller", "engines"):
            rec = state.get(group) or {}
            if rec.get("pid"):
                self.add_tree(rec["pid"], rec.get("create_time"))
            for d in rec.get("descendants", []):
                self.add_tree(d["pid"], d.get("create_time"))

    def alive(self) -> List[psutil.Process]:
        out = []
        for pid, ct in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - ct) <= 1.0 and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.Error:
                pass
        return out

    def wait_gone(self, timeout: float = 15.0) -> List[psutil.Process]:
        deadline = time.monotonic() + timeout
        while True:
            left = self.alive()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def kill_all(self) -> None:
        left = self.alive()
        for p in left:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)


def mentioning(text: str) -> List[psutil.Process]:
    """Live processes whose command line mentions ``text`` (a unique tmp path): read-only."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if text in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def describe(procs: List[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid}: {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            out.append(str(p.pid))
    return "; ".join(out)


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.ipython_dir = tmp_path / "ipython"
        self.profile_dir = tmp_path / "profile"
        self.env = dict(os.environ)
        self.env.update(
            IPYTHONDIR=str(self.ipython_dir),
            PYTHONDONTWRITEBYTECODE="1",
            PYTHONUNBUFFERED="1",
            OMPI_ALLOW_RUN_AS_ROOT="1",
            OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            OMPI_MCA_rmaps_base_oversubscribe="1",
            OMPI_MCA_mpi_yield_when_idle="1",
        )
        self.env.pop("PXF_ENGINE", None)
        self.env.pop("PXF_CONTROLLER", None)
        self.procs = Procs()

    def run(self, *args: str, timeout: float = CLI_TIMEOUT, env: Optional[dict] = None):
        res = subprocess.run([PYTHON, str(PXCLUSTER), *args], capture_output=True, text=True,
                             env=env or self.env, timeout=timeout, cwd=self.tmp)
        self._note_pids(res.stdout + res.stderr)
        return res

    def _note_pids(self, text: str) -> None:
        for m in re.finditer(r"\((?:mpirun )?pid (\d+)\)", text):
            self.procs.add_tree(int(m.group(1)))

    def security(self) -> Path:
        return self.profile_dir / "security"

    def state_file(self, cluster_id: str = "") -> Path:
        return self.security() / f"pxcluster-{cluster_id or 'default'}.json"

    def conn_files(self, cluster_id: str = "") -> List[Path]:
        prefix = f"ipcontroller-{cluster_id}" if cluster_id else "ipcontroller"
        return [self.security() / f"{prefix}-{k}.json" for k in ("client", "engine")]

    def state(self, cluster_id: str = "") -> dict:
        state = json.loads(self.state_file(cluster_id).read_text())
        self.procs.add_state(state)
        return state

    def list_json(self) -> list:
        res = self.run("list", "--json", timeout=60)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def client(self, cluster_id: str = ""):
        import ipyparallel as ipp

        old = os.environ.get("IPYTHONDIR")
        os.environ["IPYTHONDIR"] = str(self.ipython_dir)
        try:
            return ipp.Client(profile_dir=str(self.profile_dir), cluster_id=cluster_id or None,
                              timeout=30)
        finally:
            if old is None:
                os.environ.pop("IPYTHONDIR", None)
            else:
                os.environ["IPYTHONDIR"] = old


@pytest.fixture
def px(tmp_path):
    """A private IPYTHONDIR + profile dir; stops whatever is still recorded, then by PID."""
    e = Env(tmp_path)
    yield e
    survivors = []
    for state_file in e.security().glob("pxcluster-*.json") if e.security().exists() else []:
        try:
            e.procs.add_state(json.loads(state_file.read_text()))
        except (OSError, ValueError):
            pass
        cid = state_file.stem[len("pxcluster-"):]
        args = ["stop", "--profile-dir", str(e.profile_dir)]
        if cid != "default":
            args += ["--cluster-id", cid]
        try:
            e.run(*args, timeout=60)
        except subprocess.TimeoutExpired:
            pass
    for p in mentioning(str(tmp_path)):  # started with our profile dir in argv
        e.procs.add(p.pid)
    survivors = e.procs.wait_gone(timeout=5)
    e.procs.kill_all()
    assert not survivors, f"processes left behind: {describe(survivors)}"


def start_args(e: Env, n: int, kind: str, cluster_id: str = "", timeout: float = START_TIMEOUT,
               extra=()):
    args = ["start", "-n", str(n), "--profile-dir", str(e.profile_dir), "--engines", kind,
            "--timeout", str(timeout), *extra]
    if cluster_id:
        args += ["--cluster-id", cluster_id]
    return args


# ---------------------------------------------------------------------------------- pxcluster

@pytest.mark.timeout(CLI_TIMEOUT + 120)
@pytest.mark.parametrize("kind", ENGINE_KINDS)
def test_start_list_stop_leaves_nothing(px, kind):
    res = px.run(*start_args(px, 2, kind, cluster_id="t1"))
    assert res.returncode == 0, f"start failed:\n{res.stdout}\n{res.stderr}"
    assert "import ipyparallel as ipp" in res.stdout
    assert f"ipp.Client(profile_dir={str(px.profile_dir)!r}, cluster_id='t1')" in res.stdout

    state = px.state("t1")
    assert state["n"] == 2 and state["engine_kind"] == kind and state["status"] == "running"
    assert state["cluster_id"] == "t1" and Path(state["profile_dir"]) == px.profile_dir
    assert state["controller"]["argv"][0].endswith("pxcontroller")
    assert state["engines"]["argv"][1:3] == ["-n", "2"]
    assert all(p.exists() for p in px.conn_files("t1"))
    assert (px.profile_dir / "log" / "pxcontroller-t1.log").exists()
    assert (px.profile_dir / "log" / "pxengines-t1.log").exists()

    # the stock client sees 2 engines = the 2 ranks of one MPI job started by that mpirun
    rc = px.client("t1")
    try:
        assert rc.ids == [0, 1]
        info = rc[:].apply_sync(rank_info)
    finally:
        rc.close()
    assert [(r, s) for _, r, s in info] == [(0, 2), (1, 2)]
    mpirun = psutil.Process(state["engines"]["pid"])
    ranks = {c.pid for c in mpirun.children(recursive=True)}
    assert {pid for pid, _, _ in info} <= ranks
    # a local job's ranks open no listening socket of MPI's (shared memory only), pxengine none
    # at all; stock ipengines keep theirs on loopback (docs/security.md)
    listening = [(pid, c.laddr) for pid, _, _ in info
                 for c in psutil.Process(pid).connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    if kind == "pxengine":
        assert not listening, f"ranks listen on {listening}"
    else:
        assert all(addr.ip == "127.0.0.1" for _, addr in listening), f"ranks listen on {listening}"

    rows = px.list_json()
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["status"] == "running" and row["engines_registered"] == 2
    assert row["controller_alive"] and row["mpirun_alive"]
    assert row["cluster_id"] == "t1"
    text = px.run("list").stdout
    assert "running" in text and "2/2" in text

    px.procs.add_state(state)  # snapshot the live trees right before stopping
    assert len(px.procs.alive()) >= 4  # controller, mpirun, 2 ranks (+ stock nannies)
    res = px.run("stop", "--profile-dir", str(px.profile_dir), "--cluster-id", "t1", timeout=90)
    assert res.returncode == 0, res.stderr
    left = px.procs.wait_gone(timeout=5)
    assert not left, f"left behind after stop: {describe(left)}"
    assert not px.state_file("t1").exists()
    assert not any(p.exists() for p in px.conn_files("t1"))
    assert px.list_json() == []
    assert not list((px.ipython_dir / "pxcluster").glob("*.json"))


@pytest.mark.timeout(CLI_TIMEOUT + 120)
def test_second_start_refused_and_dead_engine_job_reported(px):
    res = px.run(*start_args(px, 2, "ipengine"))
    assert res.returncode == 0, f"start failed:\n{res.stdout}\n{res.stderr}"
    state = px.state()

    again = px.run(*start_args(px, 2, "ipengine", timeout=20))
    assert again.returncode != 0
    assert "already running" in again.stderr
    assert px.state()["controller"]["pid"] == state["controller"]["pid"]  # untouched

    # the engine job dies, the controller stays up: list says so
    mpirun = psutil.Process(state["engines"]["pid"])
    mpirun.send_signal(signal.SIGTERM)
    mpirun.wait(timeout=30)
    deadline = time.monotonic() + 30
    while True:
        row = px.list_json()[0]
        if not row["mpirun_alive"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert row["controller_alive"] and not row["mpirun_alive"]
    assert "engine job died" in row["status"]
    assert "engine job died" in px.run("list").stdout

    res = px.run("stop", "--profile-dir", str(px.profile_dir), timeout=90)
    assert res.returncode == 0, res.stderr
    assert not px.procs.wait_gone(timeout=5)
    assert not px.state_file().exists()
    assert not any(p.exists() for p in px.conn_files())


@pytest.mark.timeout(CLI_TIMEOUT + 120)
def test_killed_rank_reported_by_list(px):
    res = px.run(*start_args(px, 3, "pxengine"))
    assert res.returncode == 0, f"start failed:\n{res.stdout}\n{res.stderr}"
    mpirun = psutil.Process(px.state()["engines"]["pid"])
    rc = px.client()
    try:
        rank_pids = rc[:].apply_async(os.getpid).get(timeout=60)
        assert {p.pid for p in mpirun.children(recursive=True)} >= set(rank_pids)
        t0 = time.monotonic()
        psutil.Process(rank_pids[1]).send_signal(signal.SIGKILL)
        while rc.ids and time.monotonic() < t0 + 60:
            time.sleep(0.2)
        assert rc.ids == [], "the job's engines were not unregistered"
        # Within seconds, with the default 3 s ping (not after 10 missed heartbeats, ~33 s).
        assert time.monotonic() - t0 < 20
    finally:
        rc.close()
    mpirun.wait(timeout=30)
    row = px.list_json()[0]
    assert row["controller_alive"] and not row["mpirun_alive"]
    assert row["engines_registered"] == 0
    # Open MPI's own words on which rank died and how.
    assert "engine job died" in row["status"] and "signal 9" in row["status"], row["status"]

    # A new job can join the controller that is still up: pxengine against its files.
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1")
    job = subprocess.Popen([shutil.which("mpirun"), "-n", "2", str(PXENGINE),
                            f"--profile-dir={px.profile_dir}"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    px.procs.add(job.pid)
    rc = px.client()
    try:
        deadline = time.monotonic() + 60
        while len(rc.ids) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        # the ids a job asks for (its ranks) are given again once no live engine holds them,
        # as stock's hub gives a requested id
        assert sorted(rc.ids) == [0, 1]
        assert rc[:].apply_async(os.getpid).get(timeout=60)
    finally:
        rc.close()
    res = px.run("stop", "--profile-dir", str(px.profile_dir), timeout=90)
    assert res.returncode == 0, res.stderr
    job.wait(timeout=30)


@pytest.mark.timeout(180)
def test_engines_that_never_register_time_out_and_clean_up(px):
    marker = f"pxcluster-test-{uuid.uuid4().hex}"
    bogus = f"{PYTHON} -c 'import time; time.sleep(600)' {marker}"
    res = px.run(*start_args(px, 2, "ipengine", timeout=12, extra=["--engine-cmd", bogus]),
                 timeout=120)
    assert res.returncode != 0
    err = res.stderr
    assert "timed out after 12s: only 0 of 2 engines registered" in err
    log_dir = px.profile_dir / "log"
    assert str(log_dir / "pxengines-default.log") in err
    assert str(log_dir / "pxcontroller-default.log") in err
    assert (log_dir / "pxengines-default.log").exists()  # logs are kept

    # nothing left: the controller and mpirun pids printed, and every rank (found by marker,
    # read-only scan; a survivor is then stopped by its PID)
    ranks = []
    for p in psutil.process_iter(["cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []):
            ranks.append(p)
            px.procs.add(p.pid)
    assert not ranks, f"ranks left behind: {describe(ranks)}"
    assert re.search(r"controller started \(pid \d+\)", res.stdout), res.stdout
    assert re.search(r"engine job started \(mpirun pid \d+\)", res.stdout), res.stdout
    left = mentioning(str(px.profile_dir))  # controller, mpirun and ranks all carry it in argv
    assert not left, f"left behind: {describe(left)}"
    assert not px.state_file().exists()
    assert not any(p.exists() for p in px.conn_files())
    assert px.list_json() == []


@pytest.mark.timeout(150)
def test_engine_job_exiting_early_fails_fast(px):
    bogus = f"{PYTHON} -c 'raise SystemExit(3)'"
    t0 = time.monotonic()
    res = px.run(*start_args(px, 2, "ipengine", timeout=100, extra=["--engine-cmd", bogus]),
                 timeout=140)
    assert res.returncode != 0
    assert re.search(r"the engine job \(mpirun pid \d+\) exited with status [1-9]", res.stderr), \
        res.stderr
    assert time.monotonic() - t0 < 90  # did not sit out the timeout
    left = mentioning(str(px.profile_dir))
    assert not left, f"left behind: {describe(left)}"
    assert not px.state_file().exists()
    assert not any(p.exists() for p in px.conn_files())


@pytest.mark.timeout(60)
def test_missing_pxengine_is_a_clear_error_and_starts_nothing(px):
    env = dict(px.env, PXF_ENGINE=str(px.tmp / "no-such-pxengine"))
    res = px.run("start", "-n", "2", "--profile-dir", str(px.profile_dir), env=env, timeout=50)
    assert res.returncode == 1
    assert "pxengine not found" in res.stderr and "--engines ipengine" in res.stderr
    assert "controller started" not in res.stdout
    assert not px.state_file().exists()
    assert not any(p.exists() for p in px.conn_files())


@pytest.mark.timeout(60)
def test_stop_without_cluster_is_an_error(px):
    res = px.run("stop", "--profile-dir", str(px.profile_dir), "--cluster-id", "nope",
                 timeout=50)
    assert res.returncode == 1
    assert "no pxcluster cluster recorded" in res.stderr
    assert px.run("list").stdout.strip() == "no pxcluster clusters found"


# ---------------------------------------------------------------------------------- launchers

def test_launchers_resolve_by_class_path_and_entry_point_name():
    from ipyparallel.cluster.launcher import find_launcher_class
    import ipyparallel as ipp
    from pxfabric.launchers import PxControllerLauncher, PxMPIEngineSetLauncher

    assert find_launcher_class("pxfabric", "controller") is PxControllerLauncher
    assert find_launcher_class("pxfabric", "engine") is PxMPIEngineSetLauncher
    cluster = ipp.Cluster(
        controller_launcher_class="pxfabric.launchers.PxControllerLauncher",
        engine_launcher_class="pxfabric.launchers.PxMPIEngineSetLauncher")
    assert cluster.controller_launcher_class is PxControllerLauncher
    assert cluster.engine_launcher_class is PxMPIEngineSetLauncher


def test_launcher_command_lines(tmp_path):
    from pxfabric.launchers import PxControllerLauncher, PxMPIEngineSetLauncher

    ctl = PxControllerLauncher(profile_dir=str(tmp_path), cluster_id="c")
    assert ctl.args == [str(PXCONTROLLER), "--profile-dir", str(tmp_path), "--cluster-id", "c"]
    eng = PxMPIEngineSetLauncher(profile_dir=str(tmp_path), cluster_id="c")
    eng.n = 4
    assert eng.args[:3] == ["mpiexec", "-n", "4"]
    assert eng.args[3:5] == [str(PXENGINE), "--mpi"]
    assert eng.args[5:9] == ["--profile-dir", str(tmp_path), "--cluster-id", "c"]


def test_engine_launcher_with_missing_binary_raises(tmp_path):
    from ipyparallel.cluster.launcher import LauncherError
    from pxfabric.launchers import PxMPIEngineSetLauncher

    eng = PxMPIEngineSetLauncher(profile_dir=str(tmp_path),
                                 engine_cmd=[str(tmp_path / "no-such-pxengine")])
    with pytest.raises(LauncherError, match="pxengine not found"):
        eng.start(2)
    assert eng.state == "before"


def _ipcluster(e: Env, *args: str, timeout: float):
    env = dict(e.env, PYTHONPATH=os.pathsep.join(
        [str(REPO / "python")] + [p for p in e.env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([PYTHON, "-m", "ipyparallel.cluster", *args, "--profile-dir",
                           str(e.profile_dir)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=e.tmp)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engines", [
    "MPI",
    pytest.param("pxfabric", marks=pytest.mark.skipif(
        not os.access(PXENGINE, os.X_OK), reason=f"{PXENGINE} is not built yet")),
])
def test_stock_ipcluster_with_px_launchers(px, engines):
    px.profile_dir.mkdir(parents=True)
    res = _ipcluster(px, "start", "-n", "2", "--daemonize",
                     "--controller=pxfabric.launchers.PxControllerLauncher",
                     f"--engines={engines}", timeout=120)
    cluster_file = px.security() / "cluster-.json"
    info = None
    if cluster_file.exists():
        info = json.loads(cluster_file.read_text())
        px.procs.add_tree(info["controller"]["state"]["pid"])
        for s in info["engines"]["sets"].values():
            px.procs.add_tree(s["pid"])
    try:
        assert res.returncode == 0 and info, f"{res.stdout}\n{res.stderr}"
        assert info["controller"]["class"] == "pxfabric"  # abbreviated via the entry point
        ctl = psutil.Process(info["controller"]["state"]["pid"])
        assert ctl.cmdline()[0] == str(PXCONTROLLER)
        rc = px.client()
        try:
            rc.wait_for_engines(2, timeout=150)
            ranks = [r for _, r, _ in rc[:].apply_sync(rank_info)]
            for s in info["engines"]["sets"].values():
                px.procs.add_tree(s["pid"])
        finally:
            rc.close()
        assert sorted(ranks) == [0, 1]
    finally:
        stop = _ipcluster(px, "stop", timeout=120)
    assert stop.returncode == 0, stop.stderr
    left = px.procs.wait_gone(timeout=15) + mentioning(str(px.profile_dir))
    assert not left, f"left behind by ipcluster stop: {describe(left)}"
    assert not any(p.exists() for p in px.conn_files())
