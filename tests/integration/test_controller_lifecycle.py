"""Destructive tests, each with its own cluster: engine death, shutdown, SIGTERM, late engines."""

from __future__ import annotations

import os
import signal
import time

import pytest
import zmq
from ipyparallel import RemoteError, interactive
from jupyter_client.session import Session

from cluster import engine_command, mpi_engine_command, wait_for_gate, wait_until
from pxfabric.cluster import hub

pytestmark = pytest.mark.timeout(150)


@interactive
def getpid():
    import os

    return os.getpid()


@interactive
def pid_of(_):
    import os

    return os.getpid()


class NotificationListener:
    """A raw SUB on the controller's notification port, decoding with the cluster key."""

    def __init__(self, cluster):
        info = cluster.client_info()
        self.session = Session(key=info["key"].encode(), signature_scheme=info["signature_scheme"])
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(f"{info['interface']}:{info['notification']}")

    def settle(self):
        """Give the subscription time to reach the controller (PUB drops until it has)."""
        time.sleep(1.0)

    def wait_for(self, msg_type, timeout):
        deadline = time.monotonic() + timeout
        seen = []
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            _, frames = self.session.feed_identities(self.sock.recv_multipart())
            msg = self.session.deserialize(frames)
            seen.append(msg["header"]["msg_type"])
            if msg["header"]["msg_type"] == msg_type:
                return msg
        raise AssertionError(f"no {msg_type} within {timeout}s (saw {seen})")

    def close(self):
        self.sock.close()
        self.ctx.term()


def test_sigterm_removes_connection_files(make_cluster):
    cluster = make_cluster(0)
    assert cluster.client_file.exists() and cluster.engine_file.exists()
    procs = cluster.controller_processes()
    cluster.controller.send_signal(signal.SIGTERM)
    cluster.controller.wait(timeout=20)
    assert not cluster.client_file.exists()
    assert not cluster.engine_file.exists()
    wait_until(lambda: not cluster.alive(procs), 20, 0.1, "all controller processes to exit")


@interactive
def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def test_sigterm_tells_clients_engines_are_gone(make_cluster, controller_kind, request):
    """A controller stopped by SIGTERM (scancel, the walltime, pxcluster stop) first unregisters
    every engine: a client's outstanding direct and load-balanced work fails with EngineError
    and rc.ids empties, instead of waiting forever on a controller that is gone."""
    if controller_kind == "stock":
        request.node.add_marker(pytest.mark.xfail(
            strict=True, reason="stock ipcontroller exits without telling its clients"))
    from ipyparallel.error import CompositeError

    limit = 3 if controller_kind == "stock" else 20   # stock never answers: fail fast
    cluster = make_cluster(2)
    rc = cluster.client()
    try:
        direct = rc[:].apply_async(nap, 120)
        balanced = rc.load_balanced_view().apply_async(nap, 120)
        time.sleep(1.0)  # both running
        cluster.controller.send_signal(signal.SIGTERM)
        with pytest.raises(CompositeError) as err:
            direct.get(timeout=limit)
        assert [e[0] for e in err.value.elist] == ["EngineError", "EngineError"], err.value
        with pytest.raises(RemoteError) as lb_err:   # the scheduler's EngineError reply
            balanced.get(timeout=limit)
        assert lb_err.value.ename == "EngineError", lb_err.value
        wait_until(lambda: rc.ids == [], 10, 0.1, "rc.ids to empty")
    finally:
        rc.close()


def test_shutdown_hub_stops_everything(make_cluster):
    cluster = make_cluster(2)
    rc = cluster.client()
    listener = NotificationListener(cluster)
    try:
        engine_procs = cluster.engine_processes()
        controller_procs = cluster.controller_processes()
        assert len(cluster.alive(engine_procs)) >= 2
        listener.settle()
        rc.shutdown(hub=True)
        note = listener.wait_for("shutdown_notification", 15)
        assert note["content"]["status"] == "ok"
        assert cluster.controller.wait(timeout=30) == 0
        assert not cluster.client_file.exists() and not cluster.engine_file.exists()
        wait_until(lambda: not cluster.alive(controller_procs), 20, 0.1,
                   "all controller processes to exit")
        wait_until(lambda: not cluster.alive(engine_procs), 30, 0.1,
                   "all engine processes to exit")
    finally:
        listener.close()


def test_killed_engine(make_cluster, tmp_path):
    # MPI engines: ids 0 | 1 2 in two jobs; killing rank 1 of the second job (not its gateway)
    # loses that whole job, as MPI does, and nothing else. Stock engines: just engine 1.
    cluster = make_cluster(3, jobs=(1, 2))
    rc = cluster.client()
    listener = NotificationListener(cluster)
    try:
        listener.settle()
        victim = 2 if cluster.engine_kind == "mpi" else 1
        lost = cluster.job_of(victim)
        uuids = {i: rc._engines[i] for i in lost}
        gate = str(tmp_path / "gate")
        direct = rc[victim].apply_async(wait_for_gate, gate, 120)
        wait_until(lambda: os.path.exists(gate + ".started"), 30, what="the task to start")
        # A load-balanced task queued behind it on the same engine: only the controller can
        # fail it (the client does that itself for direct requests only).
        balanced = rc.load_balanced_view(targets=[victim]).apply_async(getpid)
        wait_until(lambda: rc.queue_status()[victim]["tasks"] == 1, 15, 0.1,
                   "the load-balanced task to be assigned to the engine")

        cluster.engine_process(victim).send_signal(signal.SIGKILL)

        notes = [listener.wait_for("unregistration_notification", 45)["content"] for _ in lost]
        assert {n["id"]: n["uuid"] for n in notes} == uuids
        survivors = {i: cluster.engine_pids[i] for i in (0, 1, 2) if i not in lost}
        wait_until(lambda: not set(lost) & set(rc.ids), 30, 0.1, "the client to drop the engines")
        assert sorted(rc.ids) == sorted(survivors)

        with pytest.raises(RemoteError) as excinfo:
            direct.get(timeout=30)
        assert excinfo.value.ename == "EngineError"
        with pytest.raises(RemoteError) as excinfo:
            balanced.get(timeout=45)
        assert excinfo.value.ename == "EngineError"
        assert "died" in excinfo.value.evalue

        # The survivors keep working, through every scheduler.
        assert rc[:].apply_async(getpid).get_dict(timeout=30) == survivors
        lview = rc.load_balanced_view()
        assert set(lview.map_sync(pid_of, range(8))) <= set(survivors.values())
        bview = rc.broadcast_view()
        ar = bview.apply_async(getpid)
        assert dict(zip(ar.get(timeout=30), ar.engine_id)) == {p: i for i, p in survivors.items()}

        fresh = cluster.client()
        assert sorted(fresh.ids) == sorted(survivors)

        # A new engine gets a new id (ids of dead engines are not handed out again).
        cluster.start_engines(1)
        wait_until(lambda: len(rc.ids) == len(survivors) + 1, 30, 0.1,
                   "the client to see the new engine")
        new_id = (set(rc.ids) - set(survivors)).pop()
        assert new_id not in (0, 1, 2)
        assert rc[new_id].apply_sync(getpid) == cluster.engine_pids[new_id]
    finally:
        listener.close()


def test_engine_registered_before_a_new_client_subscribed_is_still_seen(make_cluster, monkeypatch, request):
    # The stock client asks the hub for the engines (connection_request), then connects its
    # notification SUB. An engine that registers in between is in neither: the reply had no
    # engines, and a PUB drops what nobody has subscribed to yet. The client then never learns
    # of it (wait_for_engines times out with the engine up): seen in CI when a client started
    # right after sbatch printed how to connect. pxcontroller repeats recent registrations when
    # a subscription arrives. Here the engine registers exactly in that gap: the client's own
    # connect of its notification socket waits for it.
    cluster = make_cluster(0)
    if cluster.kind == "stock":
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="stock ipcontroller: a registration before a client's subscription is lost to it"))
    from ipyparallel import util as ipp_util

    port = f":{cluster.client_info()['notification']}"
    real_connect = ipp_util.connect
    started = []

    def connect(socket, url, *args, **kwargs):
        if url.endswith(port) and not started:
            argv = (mpi_engine_command(cluster.profile_dir, 1) if cluster.engine_kind == "mpi"
                    else engine_command(cluster.profile_dir))
            log = cluster.workdir / "late-engine.log"
            cluster.engine_logs.append(log)
            started.append(cluster._popen(argv, log, "engine"))
            wait_until(lambda: 0 in (hub.registered_engines(cluster.client_file) or {}), 60, 0.1,
                       "the engine to register")
            cluster.tracker.refresh()
        return real_connect(socket, url, *args, **kwargs)

    monkeypatch.setattr(ipp_util, "connect", connect)
    rc = cluster.client()
    monkeypatch.undo()
    assert started, "the client did not connect a socket to the notification port"
    rc.wait_for_engines(1, timeout=15)
    assert rc.ids == [0]
    assert rc[0].apply_sync(getpid) in {p.pid for p in cluster.engine_processes()}


def test_a_flood_of_subscriptions_repeats_registrations_at_most_ten_times_a_second(make_cluster):
    # Subscriptions are not signed; each one asks pxcontroller to repeat recent registrations
    # to every subscriber. A peer that subscribes and unsubscribes in a loop gets them
    # coalesced (one repeat per 100 ms), and the controller keeps serving.
    cluster = make_cluster(2)
    if cluster.kind == "stock":
        pytest.skip("pxcontroller's repeat of registrations (stock repeats nothing)")
    info = cluster.client_info()
    ctx = zmq.Context()
    listener = NotificationListener(cluster)
    flood = ctx.socket(zmq.SUB)
    flood.linger = 0
    try:
        def counters():
            stats = hub.controller_stats(cluster.client_file, 10)
            assert stats is not None, "the controller stopped answering\n" + cluster.logs()
            return stats["counters"]

        flood.connect(f"{info['interface']}:{info['notification']}")
        listener.settle()
        before = counters()
        t0 = time.monotonic()
        for i in range(2000):
            flood.setsockopt(zmq.SUBSCRIBE, b"flood")
            flood.setsockopt(zmq.UNSUBSCRIBE, b"flood")
        wait_until(lambda: counters()["in.notification"] - before["in.notification"] >= 1000, 20, 0.1,
                   "the controller to read the subscriptions")
        time.sleep(0.3)
        now = counters()
        elapsed = time.monotonic() - t0
        repeated = (now.get("notification.registrations_repeated", 0)
                    - before.get("notification.registrations_repeated", 0))
        # two engines registered within the last 10 s: at most two repeats per 100 ms
        assert 0 < repeated <= 2 * (int(elapsed / 0.1) + 2), (repeated, elapsed)
        seen = 0
        while listener.sock.poll(200):
            listener.sock.recv_multipart()
            seen += 1
        assert seen <= repeated + 2, (seen, repeated)
        rc = cluster.client()
        assert sorted(rc.ids) == [0, 1]
        assert len(set(rc[:].apply_sync(getpid))) == 2
    finally:
        flood.close()
        listener.close()
        ctx.term()
