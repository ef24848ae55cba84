"""Several MPI jobs on one pxcontroller, and what happens when a rank dies.

Each test starts its own pxcontroller and ``mpirun -n K pxengine`` jobs (tests/integration/
cluster.py, engine kind "mpi"), drives them with the stock client, and stops every process by
PID. MPI semantics: when one rank of a job dies, Open MPI ends the whole job; the controller
must turn that into EngineError for the job's outstanding work and unregistrations within
seconds, keep serving the other jobs, and let a new job join.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from ipyparallel import RemoteError, interactive

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster as harness  # noqa: E402
from cluster import wait_for_gate, wait_until  # noqa: E402
from test_controller_lifecycle import NotificationListener  # noqa: E402


@interactive
def getpid():
    import os

    return os.getpid()


@interactive
def comm_world():
    from mpi4py import MPI

    c = MPI.COMM_WORLD
    return c.rank, c.size, c.allreduce(1)


@interactive
def square(x):
    return x * x


@pytest.fixture
def mpi_cluster(tmp_path):
    """Factory: ``mpi_cluster(jobs=(2, 2))`` -> a started pxcontroller + MPI jobs."""
    made = []

    def make(jobs=(2, 2)) -> harness.Cluster:
        c = harness.Cluster("pxfabric", tmp_path / f"c{len(made)}", sum(jobs),
                            engine_kind="mpi", jobs=jobs)
        made.append(c)
        try:
            harness.controller_command("pxfabric")
            c.start()
        except harness.HarnessError as e:
            pytest.fail(str(e), pytrace=False)
        return c

    yield make
    for c in made:
        left = c.stop()
        assert not c.alive(c.tracker.group("engine") + c.tracker.group("controller")), c.logs()
        del left


def fabric_counters(c: harness.Cluster) -> dict:
    reply = c.query("pxf_stats_request", {}, 10)
    assert reply is not None and reply["content"]["status"] == "ok", reply
    return reply["content"]["counters"]


def job_process(c: harness.Cluster, engine_id: int):
    return c.engine_process(engine_id)


@pytest.mark.timeout(120)
def test_two_jobs_share_one_controller(mpi_cluster):
    c = mpi_cluster(jobs=(2, 3))
    rc = c.client()
    assert c.job_ids == [[0, 1], [2, 3, 4]]
    assert sorted(rc.ids) == [0, 1, 2, 3, 4]
    # Each job is its own COMM_WORLD; engine ids are ranks offset by the jobs before it.
    got = rc[:].apply_async(comm_world).get_dict(timeout=60)
    assert got == {0: (0, 2, 2), 1: (1, 2, 2), 2: (0, 3, 3), 3: (1, 3, 3), 4: (2, 3, 3)}
    # Every scheduler spans both jobs.
    assert rc.load_balanced_view().map_sync(square, range(50)) == [x * x for x in range(50)]
    before = fabric_counters(c)
    for coalescing in (True, False):
        ar = rc.broadcast_view(is_coalescing=coalescing).apply_async(getpid)
        pids = ar.get(timeout=60)
        assert dict(zip(ar.engine_id, pids)) == c.engine_pids
    after = fabric_counters(c)
    # One fabric message per job per broadcast, whatever the number of ranks.
    assert after["fabric.bcast_out"] - before.get("fabric.bcast_out", 0) == 2 * 2
    # %px-style execute on one job does not involve the other.
    rc[2, 3, 4].execute("from mpi4py import MPI; tot = MPI.COMM_WORLD.allreduce(10)", block=True)
    assert rc[2, 3, 4].pull("tot", block=True) == [30, 30, 30]


def _outstanding_work(rc, victim_job, gate):
    """Blocked work on every engine of ``victim_job``: direct applies, a load-balanced task queued
    behind them, and a coalescing broadcast over all engines."""
    direct = {i: rc[i].apply_async(wait_for_gate, f"{gate}.{i}", 120) for i in victim_job}
    wait_until(lambda: all(os.path.exists(f"{gate}.{i}.started") for i in victim_job), 60,
               what="the direct tasks to start")
    balanced = rc.load_balanced_view(targets=[victim_job[0]]).apply_async(getpid)
    wait_until(lambda: rc.queue_status()[victim_job[0]]["tasks"] == 1, 20, 0.1,
               "the load-balanced task to be assigned")
    return direct, balanced


def _assert_job_lost(c, rc, listener, lost, direct, balanced, survivors):
    notes = [listener.wait_for("unregistration_notification", 30)["content"]["id"]
             for _ in lost]
    assert sorted(notes) == sorted(lost)
    wait_until(lambda: not set(lost) & set(rc.ids), 30, 0.1, "the client to drop the engines")
    for i, ar in direct.items():
        with pytest.raises(RemoteError) as excinfo:
            ar.get(timeout=30)
        assert excinfo.value.ename == "EngineError", (i, excinfo.value)
    with pytest.raises(RemoteError) as excinfo:
        balanced.get(timeout=30)
    assert excinfo.value.ename == "EngineError"
    assert "died" in excinfo.value.evalue
    assert sorted(rc.ids) == sorted(survivors)
    assert rc[survivors].apply_async(comm_world).get(timeout=60)[0][1] == len(survivors)


def _new_job_joins(c, rc, gone):
    c.start_engines(2)
    new = c.job_ids[-1]
    assert not set(new) & set(gone) and len(new) == 2
    assert rc[new].apply_async(comm_world).get(timeout=60) == [(0, 2, 2), (1, 2, 2)]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("victim_rank", [0, 1], ids=["gateway-rank", "other-rank"])
def test_killed_rank_loses_its_job_only(mpi_cluster, tmp_path, victim_rank):
    c = mpi_cluster(jobs=(2, 2))
    rc = c.client()
    listener = NotificationListener(c)
    try:
        listener.settle()
        job_b = c.job_ids[1]
        gate = str(tmp_path / "gate")
        direct, balanced = _outstanding_work(rc, job_b, gate)
        t0 = time.monotonic()
        c.engine_process(job_b[victim_rank]).send_signal(signal.SIGKILL)
        _assert_job_lost(c, rc, listener, job_b, direct, balanced, survivors=c.job_ids[0])
        # "within seconds": the gateway's death is seen by the fabric heartbeat (250 ms
        # pings here), another rank's by mpirun ending the job.
        assert time.monotonic() - t0 < 15
        # The controller is up and the other job untouched.
        assert c.controller.poll() is None
        _new_job_joins(c, rc, job_b)
    finally:
        listener.close()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("victim_rank", [0, 1], ids=["gateway-rank", "other-rank"])
def test_send_signal_sigkill_replies_then_kills(mpi_cluster, victim_rank):
    """``rc.send_signal(SIGKILL)`` answers before the rank dies (the client waits for the reply
    with no timeout: ipyparallel 9's test_cellpx_keyboard_interrupt_SIGKILL hung), then the job
    is lost as with any killed rank."""
    c = mpi_cluster(jobs=(2, 2))
    rc = c.client()
    listener = NotificationListener(c)
    try:
        listener.settle()
        job_b = c.job_ids[1]
        victim = job_b[victim_rank]
        ar = rc.send_signal(signal.SIGKILL, targets=[victim], block=False)
        ar.result(timeout=20)  # the signal_reply arrived (a Future in 7.1, raises on error)
        notes = sorted(listener.wait_for("unregistration_notification", 30)["content"]["id"]
                       for _ in job_b)
        assert notes == job_b
        wait_until(lambda: not set(job_b) & set(rc.ids), 30, 0.1, "the client to drop the engines")
        assert sorted(rc.ids) == c.job_ids[0]
        assert rc[:].apply_async(comm_world).get(timeout=60) == [(0, 2, 2), (1, 2, 2)]
    finally:
        listener.close()


@pytest.mark.timeout(150)
def test_cell_that_exits_fails_with_engine_error(mpi_cluster):
    c = mpi_cluster(jobs=(2, 2))
    rc = c.client()
    listener = NotificationListener(c)
    try:
        listener.settle()
        job_b = c.job_ids[1]
        ar = rc[job_b[1]].execute("import os; os._exit(1)")
        notes = sorted(listener.wait_for("unregistration_notification", 30)["content"]["id"]
                       for _ in job_b)
        assert notes == job_b
        with pytest.raises(RemoteError) as excinfo:
            ar.get(timeout=30)
        assert excinfo.value.ename == "EngineError"
        assert c.controller.poll() is None
        assert sorted(rc.ids) == c.job_ids[0]
        assert rc[:].apply_async(comm_world).get(timeout=60) == [(0, 2, 2), (1, 2, 2)]
        _new_job_joins(c, rc, job_b)
    finally:
        listener.close()


@pytest.mark.timeout(150)
def test_coalescing_broadcast_with_a_rank_shut_down(mpi_cluster, tmp_path):
    """One rank of a job shuts down while a coalescing broadcast waits on it: the client gets
    EngineError, the gateway stops waiting for that rank, and the job keeps serving."""
    c = mpi_cluster(jobs=(3,))
    rc = c.client()
    gate = str(tmp_path / "gate")
    bview = rc.broadcast_view(is_coalescing=True)
    ar = bview.apply_async(wait_for_gate, gate, 120)
    wait_until(lambda: os.path.exists(gate + ".started"), 60, what="the broadcast to start")
    rc.shutdown(targets=[2], block=True)
    with pytest.raises(RemoteError) as excinfo:
        ar.get(timeout=30)
    assert excinfo.value.ename == "EngineError"
    wait_until(lambda: sorted(rc.ids) == [0, 1], 30, 0.1, "the client to drop engine 2")
    Path(gate).touch()
    wait_until(lambda: "abandoned" in c.engine_logs[0].read_text(errors="replace"), 30, 0.2,
               "the gateway to log the abandoned broadcast")
    ar2 = rc.broadcast_view(is_coalescing=True).apply_async(getpid)
    pids = ar2.get(timeout=60)
    assert dict(zip(ar2.engine_id, pids)) == {i: c.engine_pids[i] for i in (0, 1)}


@pytest.mark.timeout(150)
def test_sigterm_while_the_job_ends_with_a_rank_gone_does_not_hang(mpi_cluster):
    """Slurm's scancel signals every process of a job at once: the controller exits (rank 0 is
    told to end the job) while the other ranks are being killed, so the end-of-job barrier
    never completes. Rank 0's own SIGTERM then ends it at once (no MPI_Finalize), instead of
    waiting for Slurm's SIGKILL after KillWait (the batch script was killed with it before it
    could clean up). Here rank 1 is stopped (SIGSTOP) so that it cannot join the barrier."""
    c = mpi_cluster(jobs=(2,))
    rank0, rank1 = c.engine_process(0), c.engine_process(1)
    rank1.send_signal(signal.SIGSTOP)
    try:
        c.controller.send_signal(signal.SIGTERM)
        log = c.engine_logs[0]
        wait_until(lambda: "ending the job" in log.read_text(errors="replace"), 30, 0.1,
                   "rank 0 to start ending the job")
        time.sleep(0.5)
        assert rank0.is_running() and rank0.status() != "zombie", "rank 0 ended with rank 1 stopped"
        rank0.send_signal(signal.SIGTERM)
        wait_until(lambda: not c.alive([rank0]), 10, 0.1, "rank 0 to exit on SIGTERM")
        assert "terminated by signal 15 while ending the job" in log.read_text(errors="replace")
    finally:
        rank1.send_signal(signal.SIGCONT)
