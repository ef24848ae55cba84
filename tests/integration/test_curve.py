"""CurveZMQ: ``pxcontroller --curve`` (``IPController.enable_curve``, ``IPP_ENABLE_CURVE=1``).

Every socket the controller binds is a Curve server; its public key is ``curve_serverkey`` in
both connection files, so the stock client, stock ``ipengine`` and pxengine jobs connect
unchanged (HMAC signing stays on as well). A peer with a wrong key, or without Curve, is refused
by the handshake: the controller counts it (``curve.handshake_failed``) and keeps serving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster as harness  # noqa: E402

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def curve_cluster(tmp_path_factory):
    """pxcontroller --curve with a stock ipengine and one MPI job of two pxengine ranks."""
    c = harness.Cluster("pxfabric", tmp_path_factory.mktemp("curve"), 1, engine_kind="ipengine",
                        extra_args=["--curve", "--ping=500"])
    c.env.update(harness.MPI_ENV)
    try:
        c.start()
        c._start_batch(2, harness.ENGINE_START_TIMEOUT, mpi=True)
        c.tracker.refresh()
    except BaseException:
        c.stop()
        raise
    yield c
    c.stop()


def _stats(c) -> dict:
    reply = c.query("pxf_stats_request", {}, 5.0)
    assert reply is not None, "the controller did not answer a stats query\n" + c.logs()
    return reply["content"]


def test_files_carry_the_public_key(curve_cluster):
    client, engine = curve_cluster.client_info(), curve_cluster.engine_info()
    key = client["curve_serverkey"]
    assert isinstance(key, str) and len(key) == 40
    assert engine["curve_serverkey"] == key
    assert client["key"], "HMAC signing stays on with Curve"


def test_stock_client_stock_engines_and_pxengine_work(curve_cluster):
    import ipyparallel as ipp

    rc = curve_cluster.client()
    try:
        assert sorted(rc.ids) == [0, 1, 2]
        assert rc[:].apply_sync(ipp.interactive(lambda: 7)) == [7, 7, 7]
        square = ipp.interactive(lambda x: x * x)
        assert rc.load_balanced_view().map_sync(square, range(8)) == [x * x for x in range(8)]
        assert rc.broadcast_view().apply_sync(ipp.interactive(lambda: 1)) == [1, 1, 1]
        a = np.arange(250_000, dtype=np.float64)
        rc[:].push({"a": a}, block=True)
        rc[:].execute("t = float(a.sum())", block=True)
        assert rc[:]["t"] == [float(a.sum())] * 3
        # the MPI job's ranks are a real job
        job = curve_cluster.job_ids[0]
        rc[job].execute("from mpi4py import MPI; r = MPI.COMM_WORLD.allreduce(1)", block=True)
        assert rc[job]["r"] == [2, 2]
    finally:
        curve_cluster.close_client(rc)


@pytest.mark.parametrize("which", ["wrong-key", "no-curve"])
def test_bad_peer_is_refused_and_counted(curve_cluster, tmp_path, which):
    import ipyparallel as ipp
    import zmq

    info = curve_cluster.client_info()
    if which == "wrong-key":
        info["curve_serverkey"] = zmq.curve_keypair()[0].decode()
    else:
        info["curve_serverkey"] = None
    bad = tmp_path / "bad-client.json"
    bad.write_text(json.dumps(info))
    before = _stats(curve_cluster).get("counters", {}).get("curve.handshake_failed", 0)
    with pytest.raises(Exception) as err:
        ipp.Client(str(bad), timeout=2)
    assert "timed out" in str(err.value)
    deadline = time.monotonic() + 10
    while True:
        after = _stats(curve_cluster).get("counters", {}).get("curve.handshake_failed", 0)
        if after > before or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after > before, "the refused handshake was not counted"
    assert "CurveZMQ handshake failed" in curve_cluster.controller_log.read_text()
    rc = curve_cluster.client()  # still serving
    try:
        assert len(rc.ids) == 3
    finally:
        curve_cluster.close_client(rc)


def test_pxengine_with_a_wrong_server_key_says_so(curve_cluster, tmp_path):
    import zmq

    info = curve_cluster.engine_info()
    info["curve_serverkey"] = zmq.curve_keypair()[0].decode()
    env = dict(curve_cluster.env, IPP_CONNECTION_INFO=json.dumps(info))
    argv = [harness.mpirun(), "-n", "1", str(harness.PXENGINE), "--IPEngine.timeout=2"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode != 0
    assert "curve_serverkey" in out.stdout + out.stderr, out.stdout + out.stderr


@pytest.mark.parametrize("spelling", [["--IPController.enable_curve=True"], "IPP_ENABLE_CURVE"])
def test_stock_spellings_turn_it_on(tmp_path, spelling):
    env = dict(os.environ)
    args = []
    if spelling == "IPP_ENABLE_CURVE":
        env["IPP_ENABLE_CURVE"] = "1"
    else:
        args = spelling
    prof = tmp_path / "p"
    proc = subprocess.Popen([str(harness.PXCONTROLLER), f"--profile-dir={prof}", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        f = prof / "security" / "ipcontroller-client.json"
        harness.wait_until(lambda: f.exists() and "registration" in f.read_text(), 20, 0.05, "client file")
        assert len(json.loads(f.read_text())["curve_serverkey"]) == 40
    finally:
        proc.terminate()
        proc.wait(10)
