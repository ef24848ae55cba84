"""``pxcluster restart``: a new engine job with the same ids, under the same controller.

Real ``pxcluster`` (scripts/pxcluster), real pxcontroller and mpirun, the stock client. Every
cluster lives in a private IPYTHONDIR/profile dir under ``tmp_path`` and is stopped with
``pxcluster stop`` in the fixture's teardown, then by PID (test_pxcluster.py's ``px`` fixture).
Binaries: ``$PXF_PXCONTROLLER`` / ``$PXF_PXENGINE`` (default ``build/bin``), passed to pxcluster
as ``PXF_CONTROLLER`` / ``PXF_ENGINE``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import pytest
from ipyparallel import interactive

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_pxcluster import (  # noqa: E402  (the same helpers and teardown as test_pxcluster)
    CLI_TIMEOUT, PYTHON, REPO, describe, px, start_args,
)
from cluster import wait_until  # noqa: E402

PXCONTROLLER = Path(os.environ.get("PXF_PXCONTROLLER") or REPO / "build" / "bin" / "pxcontroller")
PXENGINE = Path(os.environ.get("PXF_PXENGINE") or REPO / "build" / "bin" / "pxengine")
RESTART_TIMEOUT = 120  # seconds `pxcluster restart` may take on 2 busy cores

pytestmark = pytest.mark.skipif(
    not (os.access(PXCONTROLLER, os.X_OK) and os.access(PXENGINE, os.X_OK)),
    reason=f"{PXCONTROLLER} / {PXENGINE} not built (bash scripts/build.sh)")

HANG_RANK_0 = ("from mpi4py import MPI; "
               "MPI.COMM_WORLD.Barrier() if MPI.COMM_WORLD.rank == 0 else None")

__all__ = ["px"]  # the fixture, imported for its teardown


def _binaries(px) -> None:
    px.env["PXF_CONTROLLER"] = str(PXCONTROLLER)
    px.env["PXF_ENGINE"] = str(PXENGINE)


def _start(px, n: int) -> dict:
    _binaries(px)
    res = px.run(*start_args(px, n, "pxengine"))
    assert res.returncode == 0, f"start failed:\n{res.stdout}\n{res.stderr}"
    return px.state()


def _restart(px, *extra: str):
    t0 = time.monotonic()
    res = px.run("restart", "--profile-dir", str(px.profile_dir), "--timeout",
                 str(RESTART_TIMEOUT), *extra, timeout=RESTART_TIMEOUT + 60)
    return res, time.monotonic() - t0


def _wait_ids(rc, want, timeout: float = 10.0):
    """``rc.ids`` once the registration notifications are in (they were sent before the
    restart returned; the client reads them when asked)."""
    deadline = time.monotonic() + timeout
    while True:
        ids = rc.ids
        if ids == want or time.monotonic() > deadline:
            return ids
        time.sleep(0.1)


@interactive
def times_six(x):
    return x * 6


@interactive
def plus_one(x):
    return x + 1


@interactive
def allreduce_rank():
    """(rank, allreduce of rank+1) on an engine; @interactive: pickled by value."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm.rank, comm.allreduce(comm.rank + 1)


def engine_errors(exc) -> list:
    """The ``ename`` of every error in a CompositeError (or of a single RemoteError)."""
    causes = getattr(exc, "elist", None)
    if causes:
        return [c[0] for c in causes]
    return [getattr(exc, "ename", type(exc).__name__)]


@pytest.mark.timeout(CLI_TIMEOUT + RESTART_TIMEOUT + 180)
def test_hung_barrier_recovered_by_restart_with_same_ids_and_same_client(px):
    from ipyparallel import error

    state = _start(px, 4)
    old_mpirun = state["engines"]["pid"]
    rc = px.client()
    rc2 = None
    try:
        assert rc.ids == [0, 1, 2, 3]
        before = rc[:].apply_async(times_six, 7)
        assert before.get(timeout=60) == [42] * 4
        recorded = before.msg_ids

        hung = rc[:].execute(HANG_RANK_0, block=False)
        rc.wait(hung.msg_ids[1:], timeout=60)  # ranks 1-3 return, rank 0 waits in Barrier
        time.sleep(0.5)
        assert not hung.ready(), "rank 0 should be stuck in Barrier"

        res, took = _restart(px)
        assert res.returncode == 0, f"restart failed:\n{res.stdout}\n{res.stderr}"
        assert "pxcluster: restarted 4 engines (ids 0-3) in" in res.stdout, res.stdout

        # the outstanding request on the old rank 0 fails with EngineError
        with pytest.raises(error.CompositeError) as info:
            hung.get(timeout=30)
        assert engine_errors(info.value) == ["EngineError"], info.value

        # the same client sees the same ids and works: a collective over the new job
        assert _wait_ids(rc, [0, 1, 2, 3]) == [0, 1, 2, 3]
        assert rc[:].apply_sync(allreduce_rank) == [(r, 10) for r in range(4)]

        # records from before the restart still answer: this client, the hub's records
        # (db_query), and a new client that has never seen them (result_request)
        assert rc.get_result(recorded).get(timeout=30) == [42] * 4
        rows = rc.db_query({"msg_id": {"$in": recorded}}, keys=["msg_id", "completed", "engine_uuid"])
        assert sorted(r["msg_id"] for r in rows) == sorted(recorded)
        assert all(r["completed"] for r in rows)
        rc2 = px.client()
        assert rc2.get_result(recorded[0]).get(timeout=30) == 42
        assert rc2.ids == [0, 1, 2, 3]

        new = px.state()
        assert new["engines"]["pid"] != old_mpirun and new["restarts"] == 1
        assert new["status"] == "running" and new["restart_seconds"] <= took
        rows = px.list_json()
        assert rows[0]["status"] == "running" and rows[0]["engines_registered"] == 4, rows
        assert (px.profile_dir / "log" / "pxengines-default.log.1").exists()
    finally:
        if rc2 is not None:
            rc2.close()
        rc.close()
    res = px.run("stop", "--profile-dir", str(px.profile_dir), timeout=90)
    assert res.returncode == 0, res.stderr
    left = px.procs.wait_gone(timeout=5)
    assert not left, f"left behind after stop: {describe(left)}"


@pytest.mark.timeout(CLI_TIMEOUT + RESTART_TIMEOUT + 180)
def test_restart_during_load_balanced_map(px):
    """Tasks running on the old engines fail with EngineError (no retries); tasks still
    waiting in the scheduler run on the new engines."""
    from ipyparallel import error

    _start(px, 4)
    rc = px.client()
    try:
        view = rc.load_balanced_view()
        amr = view.map_async(time.sleep, [2] * 8)
        msg_ids = list(amr.msg_ids)
        time.sleep(1.0)  # 4 tasks on the engines (hwm 1), 4 waiting in the scheduler
        res, _ = _restart(px)
        assert res.returncode == 0, f"restart failed:\n{res.stdout}\n{res.stderr}"
        outcomes = {}
        for mid in msg_ids:
            try:
                rc.get_result(mid).get(timeout=60)
                outcomes[mid] = "ok"
            except error.RemoteError as e:
                outcomes[mid] = e.ename
            except error.EngineError:
                outcomes[mid] = "EngineError"
        failed = [m for m, o in outcomes.items() if o != "ok"]
        assert failed, f"no task was running on the old engines: {outcomes}"
        assert all(outcomes[m] == "EngineError" for m in failed), outcomes
        assert len(outcomes) == 8
        assert _wait_ids(rc, [0, 1, 2, 3]) == [0, 1, 2, 3]
        assert view.map_sync(plus_one, range(8)) == list(range(1, 9))
    finally:
        rc.close()


@pytest.mark.timeout(CLI_TIMEOUT + RESTART_TIMEOUT + 180)
def test_restart_with_retries_runs_stranded_tasks_on_the_new_engines(px):
    _start(px, 4)
    rc = px.client()
    try:
        view = rc.load_balanced_view()
        view.retries = 1
        amr = view.map_async(time.sleep, [2] * 8)
        time.sleep(1.0)
        res, _ = _restart(px)
        assert res.returncode == 0, f"restart failed:\n{res.stdout}\n{res.stderr}"
        assert amr.get(timeout=120) == [None] * 8
    finally:
        rc.close()


@interactive
def fail_first_time(marker):
    """Raises on the first call (and leaves ``marker``); the engine's pid afterwards."""
    import os

    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first try fails")
    return os.getpid()


@pytest.mark.timeout(CLI_TIMEOUT + RESTART_TIMEOUT + 180)
def test_restart_lets_a_retried_task_run_on_the_new_engine_with_the_same_id(px, tmp_path):
    """A 1-rank job: a task that failed on engine 0 with a retry left waits (it is not sent to
    the engine it failed on); after a restart, the new engine 0 is another engine and runs it
    (stock blacklists by uuid)."""
    _start(px, 1)
    rc = px.client()
    try:
        old_pid = rc[0].apply_sync(os.getpid)
        view = rc.load_balanced_view()
        view.retries = 1
        ar = view.apply_async(fail_first_time, str(tmp_path / "tried"))
        wait_until(lambda: (tmp_path / "tried").exists(), 30, 0.1, "the first try")
        wait_until(lambda: rc.queue_status().get("unassigned") == 1, 30, 0.1,
                   "the retried task to wait in the scheduler")
        assert not ar.ready()
        res, _ = _restart(px)
        assert res.returncode == 0, f"restart failed:\n{res.stdout}\n{res.stderr}"
        new_pid = ar.get(timeout=60)
        assert new_pid != old_pid
        assert ar.engine_id == 0
    finally:
        rc.close()


@pytest.mark.timeout(120)
def test_restart_without_a_cluster_is_a_clear_error(px):
    px.profile_dir.mkdir(parents=True)
    (px.profile_dir / "security").mkdir()
    res, _ = _restart(px)
    assert res.returncode == 1
    assert "no pxcluster cluster recorded at" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    # a profile dir that does not exist at all
    res = px.run("restart", "--profile-dir", str(px.tmp / "nowhere"), timeout=60)
    assert res.returncode == 1 and "no pxcluster cluster recorded" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.timeout(CLI_TIMEOUT + 120)
def test_restart_needs_the_controller(px):
    import psutil

    state = _start(px, 2)
    ctl = psutil.Process(state["controller"]["pid"])
    ctl.kill()
    ctl.wait(timeout=30)
    res, _ = _restart(px)
    assert res.returncode == 1
    assert "restart needs the controller: pxcluster stop" in res.stderr, res.stderr


def test_restart_of_a_slurm_job_that_is_gone(px):
    """A state with a Slurm job Slurm does not know: refused in one line, nothing touched
    (tests/integration/test_slurm_pxcluster.py restarts a real one)."""
    sec = px.profile_dir / "security"
    sec.mkdir(parents=True)
    (px.profile_dir / "log").mkdir()
    spath = sec / "pxcluster-default.json"
    spath.write_text(json.dumps({
        "version": 1, "state_file": str(spath), "profile_dir": str(px.profile_dir),
        "profile": None, "cluster_id": "", "n": 2, "controller": None, "engines": None,
        "slurm": {"job_id": "999999"}, "status": "running"}))
    try:
        res = px.run("restart", "--profile-dir", str(px.profile_dir), timeout=60)
    finally:
        spath.unlink()  # nothing to stop
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "job 999999 is gone, not running" in err[0], err
    assert "pxcluster stop" in err[0], err


@pytest.mark.timeout(400)
def test_ipp_cluster_stop_and_start_engines_gives_the_same_ids(px):
    """ipyparallel 7.1 has no ``Cluster.restart_engines`` (8/9 do: stop_engines +
    start_engines); the same two steps on one ``Cluster`` with pxfabric's launchers: the new
    job's ranks get ids 0..N-1 again and the same client keeps working."""
    import ipyparallel as ipp

    _binaries(px)
    px.profile_dir.mkdir(parents=True)
    saved = {k: os.environ.get(k) for k in px.env}
    os.environ.update(px.env)  # the launchers pass this process's environment on
    cluster = ipp.Cluster(
        n=4, profile_dir=str(px.profile_dir),
        controller_launcher_class="pxfabric.launchers.PxControllerLauncher",
        engine_launcher_class="pxfabric.launchers.PxMPIEngineSetLauncher")
    rc = None
    try:
        cluster.start_controller_sync()
        px.procs.add_tree(cluster.controller.process.pid)
        cluster.start_engines_sync()
        for s in cluster.engines.values():
            px.procs.add_tree(s.process.pid)
        rc = cluster.connect_client_sync()
        rc.wait_for_engines(4, timeout=180)
        assert rc.ids == [0, 1, 2, 3]
        first = rc[:].apply_sync(os.getpid)
        old_uuids = set(rc._engines.values())

        # 8/9's restart_engines: start right after stop, no wait in between. stop returns once
        # mpirun exited, and rank 0 unregistered the job before that, so the ids are free.
        cluster.stop_engines_sync()
        cluster.start_engines_sync(4)
        for s in cluster.engines.values():
            px.procs.add_tree(s.process.pid)
        # Wait for the new job's engines (the client may still list the old ones for a moment,
        # as with stock engines), then: the same ids, not 4..7.
        deadline = time.monotonic() + 180
        while len(rc.ids) < 4 or old_uuids & set(rc._engines.values()):
            assert time.monotonic() < deadline, f"ids after stop+start: {rc.ids}"
            time.sleep(0.2)
            rc.spin()
        assert rc.ids == [0, 1, 2, 3]
        again = rc[:].apply_sync(allreduce_rank)
        assert again == [(r, 10) for r in range(4)]
        assert not set(first) & set(rc[:].apply_sync(os.getpid))
    finally:
        if rc is not None:
            rc.close()
        with contextlib.suppress(Exception):
            cluster.stop_cluster_sync()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    left = px.procs.wait_gone(timeout=15)
    assert not left, f"left behind by stop_cluster: {describe(left)}"


@pytest.mark.timeout(CLI_TIMEOUT + RESTART_TIMEOUT + 120)
def test_restart_leaves_a_stock_engine_attached_by_hand_alone(px):
    """Only the MPI job is restarted: a stock engine registered next to it keeps its id."""
    import subprocess

    import psutil

    _start(px, 2)
    log = open(px.tmp / "ipengine.log", "wb")
    eng = subprocess.Popen([PYTHON, "-m", "ipyparallel.engine",
                            f"--profile-dir={px.profile_dir}"], env=px.env, stdout=log,
                           stderr=subprocess.STDOUT, cwd=px.tmp)
    px.procs.add(eng.pid)
    rc = px.client()
    try:
        rc.wait_for_engines(3, timeout=120)
        for child in psutil.Process(eng.pid).children(recursive=True):
            px.procs.add(child.pid)  # the stock engine's nanny
        assert rc.ids == [0, 1, 2]
        stock_pid = rc[2].apply_sync(os.getpid)
        res, _ = _restart(px)
        assert res.returncode == 0, f"restart failed:\n{res.stdout}\n{res.stderr}"
        assert "restarted 2 engines (ids 0-1)" in res.stdout
        assert _wait_ids(rc, [0, 1, 2]) == [0, 1, 2]
        assert rc[2].apply_sync(os.getpid) == stock_pid
        assert rc[:2].apply_sync(allreduce_rank) == [(0, 3), (1, 3)]
    finally:
        rc.close()
        eng.terminate()
        try:
            eng.wait(timeout=15)
        except subprocess.TimeoutExpired:
            eng.kill()
            eng.wait(timeout=5)
        log.close()


@interactive
def nap(seconds):
    import time as _time
    _time.sleep(seconds)
    return seconds


@pytest.mark.timeout(CLI_TIMEOUT + RESTART_TIMEOUT + 120)
def test_restart_hung_restarts_a_job_stuck_after_an_interrupt(px):
    """``start --restart-hung 2``: a rank stuck in Barrier 2 s after an interrupt makes the
    watcher restart the job (same ids, same client); a merely busy rank is left alone; stop
    stops the watcher too."""
    import signal

    import psutil
    from ipyparallel import error

    _binaries(px)
    res = px.run(*start_args(px, 2, "pxengine", extra=["--restart-hung", "2"]))
    assert res.returncode == 0, f"start failed:\n{res.stdout}\n{res.stderr}"
    assert "stays stuck 2 s after an interrupt (watcher pid" in res.stdout, res.stdout
    state = px.state()
    watcher, old_mpirun = state["watcher"]["pid"], state["engines"]["pid"]
    rc = px.client()
    try:
        # busy without an interrupt: not restarted
        assert rc[:].apply_async(nap, 3).get(timeout=30) == [3, 3]
        assert px.state()["engines"]["pid"] == old_mpirun

        hung = rc[:].execute(HANG_RANK_0, block=False)
        rc.wait(hung.msg_ids[1:], timeout=60)
        time.sleep(0.5)
        rc.send_signal(signal.SIGINT, targets=[0])
        with pytest.raises(error.CompositeError) as info:
            hung.get(timeout=90)
        assert engine_errors(info.value) == ["EngineError"], info.value
        deadline = time.monotonic() + RESTART_TIMEOUT
        while px.state().get("restarts") != 1:
            assert time.monotonic() < deadline, Path(state["watcher"]["log"]).read_text()
            time.sleep(0.2)
        assert _wait_ids(rc, [0, 1], timeout=30) == [0, 1]
        assert rc[:].apply_sync(allreduce_rank) == [(0, 3), (1, 3)]
        log = Path(state["watcher"]["log"]).read_text()
        assert "engine(s) 0 still stuck 2 s after an interrupt" in log and \
            "restarting the job" in log and "restarted 2 engines" in log, log
    finally:
        rc.close()
    res = px.run("stop", "--profile-dir", str(px.profile_dir), timeout=90)
    assert res.returncode == 0, res.stderr
    assert not psutil.pid_exists(watcher) or \
        psutil.Process(watcher).status() == psutil.STATUS_ZOMBIE
