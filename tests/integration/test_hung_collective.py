"""A hung collective is explained: stuck-rank reports after an interrupt, and ``pxcluster where``.

Each test starts its own ``pxcluster start -n 4`` (pxcontroller + one MPI job of pxengine
ranks, from ``$PXF_PXCONTROLLER``/``$PXF_PXENGINE`` or ``build/bin``) in a private profile dir
and drives it with the stock ``ipyparallel.Client``. A rank stuck in MPI is only recovered by
ending its job, so every test stops its cluster (``pxcluster stop``, then any survivor by PID
from the state file) in a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from ipyparallel import interactive

PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[2]
PXCLUSTER = REPO / "scripts" / "pxcluster"
PXENGINE = Path(os.environ.get("PXF_PXENGINE") or REPO / "build" / "bin" / "pxengine")
PXCONTROLLER = Path(os.environ.get("PXF_PXCONTROLLER") or REPO / "build" / "bin" / "pxcontroller")
START_TIMEOUT = 120
GRACE = 3.0  # pxengine's default --interrupt-grace
SLACK = 12.0  # 2 busy cores: the report may take a while to travel

pytestmark = pytest.mark.skipif(
    not (os.access(PXENGINE, os.X_OK) and os.access(PXCONTROLLER, os.X_OK)),
    reason=f"{PXENGINE} / {PXCONTROLLER} not built (bash scripts/build.sh)")

BARRIER_CELL = "if MPI.COMM_WORLD.rank == 0: MPI.COMM_WORLD.Barrier()"


class PxCluster:
    """``pxcluster start -n N`` in ``tmp_path``; :meth:`stop` ends it and every process by PID."""

    def __init__(self, tmp_path: Path, n: int = 4, engines: str = "pxengine") -> None:
        self.profile_dir = tmp_path / "profile"
        self.env = dict(os.environ)
        self.env.update(
            IPYTHONDIR=str(tmp_path / "ipython"), PYTHONDONTWRITEBYTECODE="1",
            OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1",
            PXF_ENGINE=str(PXENGINE), PXF_CONTROLLER=str(PXCONTROLLER))
        self.env.pop("PXF_INTERRUPT_GRACE", None)
        self.n = n
        self.engines = engines
        self.pids: "dict[int, float]" = {}
        self.clients = []

    def run(self, *args: str, timeout: float = 60):
        return subprocess.run([PYTHON, str(PXCLUSTER), *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    def selector(self):
        return ["--profile-dir", str(self.profile_dir)]

    def start(self) -> None:
        res = self.run("start", "-n", str(self.n), *self.selector(), "--engines", self.engines,
                       "--timeout",
                       str(START_TIMEOUT), timeout=START_TIMEOUT + 60)
        self._note_state()
        assert res.returncode == 0, f"pxcluster start failed:\n{res.stdout}\n{res.stderr}"

    def _note_state(self) -> None:
        path = self.profile_dir / "security" / "pxcluster-default.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        for group in ("controller", "engines"):
            rec = state.get(group) or {}
            for pid in [rec.get("pid")] + [d.get("pid") for d in rec.get("descendants", [])]:
                if not pid:
                    continue
                try:
                    proc = psutil.Process(pid)
                    self.pids[pid] = proc.create_time()
                    for child in proc.children(recursive=True):
                        self.pids[child.pid] = child.create_time()
                except psutil.Error:
                    pass

    def client(self):
        import ipyparallel as ipp

        rc = ipp.Client(str(self.profile_dir / "security" / "ipcontroller-client.json"),
                        timeout=30)
        self.clients.append(rc)
        deadline = time.monotonic() + 30
        while len(rc.ids) < self.n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(rc.ids) == self.n, rc.ids
        return rc

    def where(self, *extra: str):
        return self.run("where", *self.selector(), *extra, timeout=60)

    def stop(self) -> None:
        for rc in self.clients:
            try:
                rc.close(linger=0)
            except Exception:
                pass
        self._note_state()
        try:
            self.run("stop", *self.selector(), timeout=60)
        except subprocess.TimeoutExpired:
            pass
        left = []
        for pid, ct in self.pids.items():
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - ct) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc)
            except psutil.Error:
                pass
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)


@pytest.fixture
def pxc(tmp_path):
    c = PxCluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def wait_for_stderr(ar, index: int, needle: str, timeout: float) -> str:
    """Engine ``index``'s stderr in ``ar`` once it contains ``needle`` (the request itself
    never finishes)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        stderr = ar.stderr  # a str for a single-engine result, else one per engine
        text = (stderr if isinstance(stderr, str) else stderr[index]) or ""
        if needle in text:
            return text
        time.sleep(0.1)
    return text


@interactive
def answer():
    """@interactive: runs in the engine's namespace (this module is not importable there)."""
    return 7


@interactive
def wait_for_nothing():
    """rank 0 waits for a message rank 1 never sends."""
    from mpi4py import MPI
    return MPI.COMM_WORLD.recv(source=1, tag=77)


def mpi_import(rc):
    rc[:].execute("from mpi4py import MPI", block=True)


@pytest.mark.timeout(START_TIMEOUT + 120)
def test_barrier_hang_is_explained_and_where_shows_every_rank(pxc):
    rc = pxc.client()
    mpi_import(rc)
    dv = rc[:]
    ar = dv.execute(BARRIER_CELL, block=False)
    rc[1:].execute("pass", block=True)  # ranks 1-3 are done; rank 0 waits for them in vain
    assert not ar.ready()

    t0 = time.monotonic()
    rc.send_signal(signal.SIGINT, targets=[0], block=True)
    report = wait_for_stderr(ar, 0, "pxcluster restart", GRACE + SLACK)
    took = time.monotonic() - t0
    assert "Barrier" in report and "line 1" in report, report
    assert "rank 0" in report and "pxcluster where" in report, report
    assert "`Comm.Barrier`" in report, report
    assert took >= GRACE - 0.5, f"reported after {took:.1f} s, before the grace period"
    assert not ar.ready()
    # Only the stuck rank reports; the others still answer.
    assert all(not (s or "") for s in ar.stderr[1:]), ar.stderr
    assert rc[1:].apply_sync(answer) == [7, 7, 7]

    res = pxc.where()
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "rank 0: in `Comm.Barrier`" in out and "line 1" in out, out
    assert "ranks 1-3: idle" in out, out
    assert "interrupted" in out, out

    res = pxc.where("--json")
    assert res.returncode == 0, res.stderr
    states = json.loads(res.stdout)
    assert states["0"]["state"] == "busy" and states["0"]["call"] == "Comm.Barrier", states["0"]
    assert states["0"]["msg_id"] == ar.msg_ids[0]
    assert [states[str(i)]["state"] for i in (1, 2, 3)] == ["idle"] * 3


@pytest.mark.timeout(START_TIMEOUT + 120)
def test_recv_without_sender_is_explained(pxc):
    rc = pxc.client()
    mpi_import(rc)

    ar = rc[0].apply_async(wait_for_nothing)
    time.sleep(1.0)
    assert not ar.ready()
    rc.send_signal(signal.SIGINT, block=True)  # every rank: only rank 0 runs something
    report = wait_for_stderr(ar, 0, "pxcluster restart", GRACE + SLACK)
    assert "`Comm.recv`" in report and "wait_for_nothing" in report, report
    assert "MPI.COMM_WORLD.recv(source=1, tag=77)" in report, report
    assert not ar.ready()
    assert rc[1:].apply_sync(answer) == [7, 7, 7]

    res = pxc.where()
    assert res.returncode == 0, res.stderr
    assert "rank 0: in `Comm.recv`" in res.stdout and "ranks 1-3: idle" in res.stdout, res.stdout


@pytest.mark.timeout(START_TIMEOUT + 120)
def test_rank_holding_the_gil_in_native_code_still_reports(pxc):
    """MPI_Barrier called through ctypes.PyDLL keeps the GIL: the control thread cannot even
    run the signal request, yet the report (from faulthandler's dump) and `where` arrive."""
    rc = pxc.client()
    mpi_import(rc)
    rc[:].execute("import ctypes", block=True)
    cell = ("if MPI.COMM_WORLD.rank == 0: ctypes.PyDLL(None).MPI_Barrier("
            "ctypes.c_void_p(MPI._handleof(MPI.COMM_WORLD)))")
    ar = rc[:].execute(cell, block=False)
    rc[1:].execute("pass", block=True)
    time.sleep(1.0)
    rc.send_signal(signal.SIGINT, targets=[0], block=False)  # never answered: GIL held
    report = wait_for_stderr(ar, 0, "pxcluster restart", GRACE + SLACK)
    assert "holds the GIL in native code" in report and "line 1 in <module>" in report, report
    assert "IPython" not in report, report  # the engine's own frames are left out
    res = pxc.where()
    assert res.returncode == 0, res.stderr
    assert "rank 0: in native code, holding the GIL" in res.stdout, res.stdout
    assert "ranks 1-3: idle" in res.stdout, res.stdout


@pytest.mark.timeout(START_TIMEOUT + 90)
def test_interrupt_that_lands_gives_keyboard_interrupt_and_no_report(pxc):
    rc = pxc.client()
    ar = rc[:].execute("import time; time.sleep(60)", block=False)
    time.sleep(1.0)
    rc.send_signal(signal.SIGINT, block=True)
    with pytest.raises(Exception) as info:
        ar.get(timeout=30)
    assert "KeyboardInterrupt" in str(info.value), info.value
    time.sleep(GRACE + 1.0)  # past the grace period: still no report
    assert all("pxfabric" not in (s or "") for s in ar.stderr), ar.stderr
    res = pxc.where()
    assert res.returncode == 0, res.stderr
    assert "ranks 0-3: idle" in res.stdout, res.stdout


@pytest.mark.timeout(START_TIMEOUT + 90)
def test_where_names_engines_that_do_not_answer(tmp_path):
    """Stock ipengines do not know `pxf_where_request`: named after --timeout, no hang."""
    c = PxCluster(tmp_path, n=2, engines="ipengine")
    try:
        c.start()
        t0 = time.monotonic()
        res = c.where("--timeout", "3")
        assert res.returncode == 0, res.stderr
        assert "engines 0-1: do not answer where-requests (a stock ipengine?)" in res.stdout, \
            res.stdout
        assert time.monotonic() - t0 < 30
    finally:
        c.stop()
