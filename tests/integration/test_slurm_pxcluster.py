"""pxfabric on a real Slurm (``slurm.py``: munged + slurmctld + slurmd, config in a temp dir).

* ``pxcluster start --slurm`` / ``list`` / ``stop``: the job runs the controller on its node and
  one MPI job of pxengine (``srun --mpi=pmix``); the stock client drives the ranks; stop
  scancels and nothing is left (no job, no process, no connection file, no state);
* ``sbatch slurm/pxfabric.sbatch`` by hand (``PXF_LAUNCH=mpirun``: Open MPI inside the
  allocation), the stock client, ``scancel``;
* a job cancelled by someone else shows in ``pxcluster list``, and ``stop`` cleans up;
* bad input: an unknown partition, a walltime over the partition's limit, an account the
  partition does not allow, a job still pending at ``--timeout``, a template naming an unknown
  placeholder, a missing template: Slurm's words and what to do; nothing left behind.

The ipcluster launcher and the time limit are in ``test_slurm_launcher.py``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from test_pxcluster import mentioning  # noqa: E402

PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[2]
PXENGINE = REPO / "build" / "bin" / "pxengine"
PXCONTROLLER = REPO / "build" / "bin" / "pxcontroller"
SBATCH_SCRIPT = REPO / "slurm" / "pxfabric.sbatch"

# an extra partition only the (nonexistent) account "physics" may use
SLURM_PARTITIONS = {"physics": "AllowAccounts=physics"}
START_TIMEOUT = 60
CLI_TIMEOUT = START_TIMEOUT + 40

pytestmark = pytest.mark.skipif(
    not (os.access(PXENGINE, os.X_OK) and os.access(PXCONTROLLER, os.X_OK)),
    reason="build/bin/pxengine and build/bin/pxcontroller are needed (bash scripts/build.sh)")


# ---------------------------------------------------------------------------------- helpers

@pytest.fixture
def ipydir(tmp_path):
    d = tmp_path / "ipython"
    d.mkdir()
    return d


def _env(ipydir, extra=None):
    env = {"PYTHONPATH": str(REPO / "python"), "IPYTHONDIR": str(ipydir),
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra or {})
    return env


def pxcluster(slurm, ipydir, *args, timeout=CLI_TIMEOUT, env=None):
    return slurm.run([PYTHON, "-m", "pxfabric", *[str(a) for a in args]], timeout=timeout,
                     env=_env(ipydir, env), cwd=str(ipydir))


ours = mentioning   # live processes whose command line names our private dir


def wait_no_processes(marker: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        left = ours(marker)
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError("left behind: " + "; ".join(
                f"{p.pid} {' '.join(p.cmdline())}" for p in left))
        time.sleep(0.2)


def security_files(profile: Path):
    sec = profile / "security"
    return sorted(p.name for p in sec.glob("*.json")) if sec.is_dir() else []


def client(profile: Path, cluster_id: str = "", n: int = 0, timeout: float = 30):
    import ipyparallel as ipp
    rc = ipp.Client(profile_dir=str(profile), cluster_id=cluster_id or None, timeout=timeout)
    if n:
        rc.wait_for_engines(n, timeout=timeout)
    return rc


from ipyparallel import interactive  # noqa: E402  (functions shipped by value)


@interactive
def _job_env():
    import os as _os
    return (_os.environ.get("SLURM_JOB_ID"), _os.environ.get("PXF_JOB_END"),
            _os.environ.get("SLURM_PROCID"))


@interactive
def _allreduce():
    from mpi4py import MPI
    return MPI.COMM_WORLD.allreduce(MPI.COMM_WORLD.rank)


# ------------------------------------------------------------------------ start, list, stop

def test_pxcluster_start_list_stop(slurm, ipydir):
    profile = ipydir / "profile_default"
    r = pxcluster(slurm, ipydir, "start", "-n", 4, "--slurm", "--time", "10", "--partition",
                  "debug", "--timeout", START_TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    err = r.stdout + r.stderr
    assert "pxcluster: submitted job" in err and "4 ranks, walltime 10, partition debug" in err
    job = err.split("submitted job ")[1].split()[0]
    assert f"job {job} running on {slurm.node_names[0]}; 4/4 engines registered in" in err
    assert "rc = ipp.Client(profile='default')" in r.stdout
    assert f"(scancel {job})" in r.stdout
    assert f"--remote-profile-dir {profile}" in r.stdout      # the laptop recipe

    rc = client(profile, n=4)
    try:
        assert rc.ids == [0, 1, 2, 3]
        env = rc[:].apply_sync(_job_env)
        assert {e[0] for e in env} == {job}
        assert all(e[1] for e in env), env            # the engines know the job's end
        assert sorted(e[2] for e in env) == ["0", "1", "2", "3"]   # srun started the ranks
        assert rc[:].apply_sync(_allreduce) == [6, 6, 6, 6]
    finally:
        rc.close()

    r = pxcluster(slurm, ipydir, "list", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["slurm_job"] == job and row["slurm_state"] == "RUNNING"
    assert row["engines_registered"] == 4 and row["nodes"] == slurm.node_names[0]
    assert row["time_left"] and row["time_left"] != "no limit"
    r = pxcluster(slurm, ipydir, "list")
    assert f"slurm job {job}" in r.stdout and "left, 4/4 engines registered" in r.stdout

    # a second start on the same profile is refused while the job lives
    r = pxcluster(slurm, ipydir, "start", "-n", 2, "--slurm", "--timeout", 20)
    assert r.returncode == 1 and "already running" in r.stderr, r.stderr

    r = pxcluster(slurm, ipydir, "stop")
    assert r.returncode == 0, r.stderr
    assert f"cancelling job {job}" in r.stdout
    assert slurm.job_state(job) == "CANCELLED"
    assert not slurm.squeue(job)
    assert security_files(profile) == []          # connection files and state removed
    wait_no_processes(str(profile))
    out = (profile / "log" / f"pxslurm-default-{job}.out").read_text()
    assert "stopping (signal TERM" in out and "pxfabric: stopped" in out


@interactive
def _pid():
    import os as _os
    return _os.getpid()


@pytest.mark.timeout(400)
def test_restart_in_the_allocation(slurm, ipydir):
    """``pxcluster restart`` of a Slurm cluster with rank 0 stuck in a Barrier: the batch job
    ends its engine step and starts a new one in the same allocation; the controller inside the
    job and the client stay, the hung cell fails with EngineError, the new ranks get ids 0..3.
    Then ``--restart-hung 2`` does the same by itself after an interrupt that does not land."""
    from ipyparallel import RemoteError

    profile = ipydir / "profile_default"
    r = pxcluster(slurm, ipydir, "start", "-n", 4, "--slurm", "--time", "10", "--timeout",
                  START_TIMEOUT, "--restart-hung", 2)
    assert r.returncode == 0, r.stdout + r.stderr
    job = (r.stdout + r.stderr).split("submitted job ")[1].split()[0]
    assert "stays stuck 2 s after an interrupt (watcher pid" in r.stdout, r.stdout
    spath = profile / "security" / "pxcluster-default.json"
    watcher = json.loads(spath.read_text())["watcher"]
    rc = client(profile, n=4)
    try:
        old_pids = rc[:].apply_sync(_pid)
        old_uuids = set(rc._engines.values())
        hung = rc[0].execute("from mpi4py import MPI; MPI.COMM_WORLD.Barrier()", block=False)
        time.sleep(0.5)
        r = pxcluster(slurm, ipydir, "restart", "--timeout", START_TIMEOUT)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"scancel --batch --signal=USR2 {job}" in r.stdout
        assert "restarted 4 engines (ids 0-3)" in r.stdout, r.stdout
        with pytest.raises(RemoteError) as err:
            hung.get(timeout=30)
        assert err.value.ename == "EngineError"
        deadline = time.monotonic() + 30
        while old_uuids & set(rc._engines.values()) or len(rc.ids) != 4:
            assert time.monotonic() < deadline, rc.ids
            time.sleep(0.1)
            rc.spin()
        new_pids = rc[:].apply_sync(_pid)
        assert not set(new_pids) & set(old_pids)
        assert rc.ids == [0, 1, 2, 3]
        assert rc[:].apply_sync(_allreduce) == [6, 6, 6, 6]
        assert slurm.job_state(job) == "RUNNING"   # the same allocation

        # --restart-hung: the watcher on this (login) node restarts through the batch job
        # once rank 0 stays stuck 2 s after an interrupt
        old_uuids = set(rc._engines.values())
        hung = rc[0].execute("from mpi4py import MPI; MPI.COMM_WORLD.Barrier()", block=False)
        time.sleep(0.5)
        rc.send_signal(signal.SIGINT, targets=[0])
        with pytest.raises(RemoteError) as err:
            hung.get(timeout=90)
        assert err.value.ename == "EngineError"
        deadline = time.monotonic() + 90
        while json.loads(spath.read_text()).get("restarts") != 2:
            assert time.monotonic() < deadline, Path(watcher["log"]).read_text()
            time.sleep(0.2)
        while old_uuids & set(rc._engines.values()) or len(rc.ids) != 4:
            assert time.monotonic() < deadline, rc.ids
            time.sleep(0.1)
            rc.spin()
        assert rc[:].apply_sync(_allreduce) == [6, 6, 6, 6]
        log = Path(watcher["log"]).read_text()
        assert "engine(s) 0 still stuck 2 s after an interrupt" in log, log
        assert "restarted 4 engines" in log, log
    finally:
        rc.close()
    r = pxcluster(slurm, ipydir, "list", "--json")
    (row,) = json.loads(r.stdout)
    assert row["slurm_job"] == job and row["engines_registered"] == 4
    r = pxcluster(slurm, ipydir, "stop")
    assert r.returncode == 0, r.stderr
    out = (profile / "log" / f"pxslurm-default-{job}.out").read_text()
    assert "USR2: restarting the engines" in out and "restart 2: the old engine job ended" in out
    assert not (profile / "log" / f"pxengines-{job}.restart").exists()
    assert not psutil.pid_exists(watcher["pid"]) or \
        psutil.Process(watcher["pid"]).status() == psutil.STATUS_ZOMBIE
    wait_no_processes(str(profile))


def test_sbatch_by_hand_with_mpirun(slurm, ipydir):
    """What an HPC user types: sbatch the script; the job output says how to connect."""
    profile = ipydir / "profile_byhand"
    env = {"IPP_PROFILE_DIR": str(profile), "IPP_CLUSTER_ID": "hand", "PXF_LAUNCH": "mpirun"}
    r = slurm.run(["sbatch", "--parsable", "--ntasks=3", "--time=5", str(SBATCH_SCRIPT)],
                  env=_env(ipydir, env), cwd=str(ipydir))
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    out = ipydir / f"slurm-{job}.out"
    deadline = time.monotonic() + START_TIMEOUT
    while "stop with: scancel" not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no output"
        assert slurm.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            out.read_text() if out.exists() else slurm.show_job(job)
        time.sleep(0.2)
    text = out.read_text()
    assert f"rc = ipp.Client(profile_dir='{profile}', cluster_id='hand')" in text
    assert "via mpirun" in text and f"--remote-profile-dir {profile} --cluster-id hand" in text
    rc = client(profile, "hand", n=3)
    try:
        assert rc[:].apply_sync(_allreduce) == [3, 3, 3]
        assert {e[0] for e in rc[:].apply_sync(_job_env)} == {job}
    finally:
        rc.close()
    assert slurm.run(["scancel", job]).returncode == 0
    assert slurm.wait_job_gone(job, timeout=30) == "CANCELLED"
    wait_no_processes(str(profile))
    assert security_files(profile) == []
    assert "engines first, then the controller" in out.read_text()


def test_cancelled_by_someone_else(slurm, ipydir):
    profile = ipydir / "profile_default"
    r = pxcluster(slurm, ipydir, "start", "-n", 2, "--slurm", "--cluster-id", "other",
                  "--timeout", START_TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.split("submitted job ")[1].split()[0]
    assert slurm.run(["scancel", job]).returncode == 0
    slurm.wait_job_gone(job, timeout=30)
    r = pxcluster(slurm, ipydir, "list")
    assert f"job {job} ended: CANCELLED" in r.stdout and "`pxcluster stop` removes" in r.stdout
    r = pxcluster(slurm, ipydir, "stop", "--cluster-id", "other")
    assert r.returncode == 0, r.stderr
    assert security_files(profile) == []
    wait_no_processes(str(profile))


# --------------------------------------------------------------------------------- bad input

def _assert_nothing_left(slurm, ipydir, profile_name="default"):
    assert slurm.squeue() == []
    profile = ipydir / f"profile_{profile_name}"
    assert security_files(profile) == []
    wait_no_processes(str(profile))


@pytest.mark.parametrize("args, words, hint", [
    (["--partition", "nope"], "invalid partition specified: nope", "`sinfo -s`"),
    (["--partition", "short", "--time", "30"], "Requested time limit is invalid",
     "ask for less time"),
    (["--partition", "physics", "--account", "chemistry"], "Invalid account",
     "use an account"),
], ids=["partition", "walltime", "account"])
def test_refused_by_sbatch(slurm, ipydir, args, words, hint):
    r = pxcluster(slurm, ipydir, "start", "-n", 2, "--slurm", *args, "--timeout", 20)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "sbatch refused the job: " in r.stderr and words in r.stderr, r.stderr
    assert hint in r.stderr.split("what to do: ")[1], r.stderr
    _assert_nothing_left(slurm, ipydir)


def test_pending_past_timeout(slurm, ipydir):
    # a job that cannot start yet (its begin time is in an hour): Slurm's reason, cancelled
    r = pxcluster(slurm, ipydir, "start", "-n", 2, "--slurm", "--slurm-args",
                  "--begin=now+1hour", "--timeout", 4)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pending (BeginTime)" in r.stdout
    assert "timed out after 4s" in r.stderr and "still pending (Slurm's reason: BeginTime)" \
        in r.stderr and "cancelled it" in r.stderr, r.stderr
    job = r.stdout.split("submitted job ")[1].split()[0]
    assert slurm.job_state(job) == "CANCELLED"
    _assert_nothing_left(slurm, ipydir)


def test_bad_templates(slurm, ipydir, tmp_path):
    bad = tmp_path / "site.sbatch"
    bad.write_text("#!/bin/bash\n#SBATCH --ntasks={n}\n#SBATCH --mem={memory}\necho ${HOME}\n")
    r = pxcluster(slurm, ipydir, "start", "-n", 2, "--slurm", "--slurm-template", bad,
                  "--timeout", 10)
    assert r.returncode == 1
    assert "uses {memory}, which pxcluster does not know" in r.stderr, r.stderr
    r = pxcluster(slurm, ipydir, "start", "-n", 2, "--slurm", "--slurm-template",
                  tmp_path / "missing.sbatch", "--timeout", 10)
    assert r.returncode == 1
    assert "cannot read the batch template" in r.stderr and "missing.sbatch" in r.stderr
    r = pxcluster(slurm, ipydir, "start", "-n", 2, "--time", "10", "--timeout", 10)
    assert r.returncode == 1 and "need --slurm" in r.stderr, r.stderr
    _assert_nothing_left(slurm, ipydir)


def test_site_template(slurm, ipydir, tmp_path):
    """A site's template with ipyparallel's names and shell variables in braces."""
    site = tmp_path / "site.sbatch"
    site.write_text("#!/bin/bash\n#SBATCH --job-name=site-{cluster_id}\n#SBATCH --ntasks={n}\n"
                    "#SBATCH --output={output}\n"
                    "echo \"site set-up for ${SLURM_JOB_ID}: {n} ranks\"\n"
                    "export PXF_HOME={pxf_home}\nexec /bin/bash {job_script}\n")
    r = pxcluster(slurm, ipydir, "start", "-n", 2, "--slurm", "--slurm-template", site,
                  "--cluster-id", "site", "--timeout", START_TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.split("submitted job ")[1].split()[0]
    assert slurm.show_job(job).get("JobName") == "site-site"
    r = pxcluster(slurm, ipydir, "stop", "--cluster-id", "site")
    assert r.returncode == 0, r.stderr
    out = (ipydir / "profile_default" / "log" / f"pxslurm-site-{job}.out").read_text()
    assert f"site set-up for {job}: 2 ranks" in out
    _assert_nothing_left(slurm, ipydir)
