"""ipyparallel's own tooling on a real Slurm: ``ipcluster start --engines=pxfabric-slurm`` and
``ipp.Cluster(engine_launcher_class="pxfabric-slurm")`` (pxcontroller here, the engines one
batch job of pxengine ranks), and what a client sees when Slurm ends that job at its time limit
(``--time=1``: the engines unregister, their outstanding work fails with ``EngineError``, the
controller and the client stay usable). The time-limit test takes 60-95 s: Slurm's limits are
whole minutes and slurmctld checks them every 30 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[2]
PXENGINE = REPO / "build" / "bin" / "pxengine"
PXCONTROLLER = REPO / "build" / "bin" / "pxcontroller"

pytestmark = pytest.mark.skipif(
    not (os.access(PXENGINE, os.X_OK) and os.access(PXCONTROLLER, os.X_OK)),
    reason="build/bin/pxengine and build/bin/pxcontroller are needed (bash scripts/build.sh)")

sys.path.insert(0, str(REPO / "python"))      # the pxfabric entry points (python/*.egg-info)


@pytest.fixture
def slurm_env(slurm, monkeypatch, tmp_path):
    """This process talks to the test Slurm (the launchers run sbatch with os.environ) from a
    scratch directory (the stock launcher writes its batch script into the cwd)."""
    for k, v in slurm.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", str(REPO / "python"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_ipcluster_engines_pxfabric_slurm(slurm, slurm_env):
    ipydir = slurm_env / "ipython"
    env = {**os.environ, "IPYTHONDIR": str(ipydir)}
    start = subprocess.run(
        [PYTHON, "-m", "ipyparallel.cluster", "start", "-n", "3", "--controller=pxfabric",
         "--engines=pxfabric-slurm", "--cluster-id=ipc", "--daemonize",
         "--SlurmEngineSetLauncher.timelimit=5"],
        env=env, capture_output=True, text=True, timeout=60)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        import ipyparallel as ipp
        rc = ipp.Client(profile_dir=str(ipydir / "profile_default"), cluster_id="ipc",
                        timeout=30)
        try:
            rc.wait_for_engines(3, timeout=60)
            jobs = rc[:].apply_sync(ipp.interactive(
                lambda: __import__("os").environ.get("SLURM_JOB_ID")))
            (job,) = set(jobs)
            assert slurm.show_job(job)["JobName"] == "pxfabric-engines-ipc"
            assert slurm.show_job(job)["TimeLimit"] == "00:05:00"
        finally:
            rc.close()
    finally:
        stop = subprocess.run([PYTHON, "-m", "ipyparallel.cluster", "stop", "--cluster-id=ipc"],
                              env=env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert slurm.wait_job_gone(job, timeout=30) == "CANCELLED"


@pytest.mark.timeout(240)
def test_time_limit_unregisters_engines(slurm, slurm_env):
    import ipyparallel as ipp
    from ipyparallel.error import CompositeError
    from traitlets.config import Config

    cfg = Config()
    cfg.PxSlurmEngineSetLauncher.timelimit = "1"
    cluster = ipp.Cluster(controller_launcher_class="pxfabric",
                          engine_launcher_class="pxfabric-slurm", n=2, cluster_id="walltime",
                          profile_dir=str(slurm_env / "profile"), config=cfg)
    cluster.start_cluster_sync()
    try:
        rc = cluster.connect_client_sync()
        rc.wait_for_engines(2, timeout=60)
        job = rc[0].apply_sync(ipp.interactive(
            lambda: __import__("os").environ.get("SLURM_JOB_ID")))
        assert slurm.show_job(job)["TimeLimit"] == "00:01:00"
        # outstanding work on both engines when the walltime ends
        pending = rc[:].apply_async(ipp.interactive(lambda: __import__("time").sleep(600)))
        assert slurm.wait_job_gone(job, timeout=150) == "TIMEOUT"
        with pytest.raises(CompositeError) as err:
            pending.get(timeout=30)
        assert [e[0] for e in err.value.elist] == ["EngineError", "EngineError"], err.value
        deadline = time.monotonic() + 30
        while rc.ids:
            assert time.monotonic() < deadline, f"engines still registered: {rc.ids}"
            rc.spin()
            time.sleep(0.2)
        # the controller outlived the job and still answers
        assert rc.queue_status() is not None
        rc.close()
    finally:
        cluster.stop_cluster_sync()
