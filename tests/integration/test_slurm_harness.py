"""The private Slurm of ``slurm.py`` works: what Slurm-launched pxfabric tests rely on.

Single-node (``slurm`` fixture, this machine): the node is idle, batch jobs run and write
their output file, ``srun --mpi=pmix`` starts an MPI job (8 ranks on 2 cores), ``scancel``
ends a job with the state ``job_state`` reports, and Slurm itself refuses
bad requests (a ``--time`` above the partition's MaxTime, an unknown partition). Two-node
(``slurm_two_nodes``, namespaced hosts nodeA + nodeB): one job step spans both nodes.

The time limit (60-95 s: Slurm's resolution is a minute and slurmctld checks time limits every
30 s, hard-coded) is tested once, with pxfabric engines: test_slurm_launcher.py.
"""

from __future__ import annotations

MPI_HELLO = ("from mpi4py import MPI; import socket; c = MPI.COMM_WORLD; "
             "print('rank', c.rank, 'of', c.size, socket.gethostname(), flush=True)")


def test_node_idle(slurm):
    r = slurm.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %T %c"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [slurm.node_names[0], "idle", str(slurm.cpus)]


def test_sbatch_wrap_writes_output(slurm):
    job = slurm.sbatch("--wrap", "echo hello from $SLURM_JOB_ID")
    assert slurm.wait_job_gone(job, timeout=30) == "COMPLETED"
    out = slurm.workdir / f"slurm-{job}.out"       # sbatch's default: the submission cwd
    assert out.read_text() == f"hello from {job}\n"


def test_srun_pmix_mpi4py(slurm):
    r = slurm.run(["srun", "--mpi=pmix", "-n", "2", "/usr/bin/python3", "-c", MPI_HELLO],
                  timeout=60)
    assert r.returncode == 0, r.stderr
    ranks = sorted(line.split()[:4] for line in r.stdout.splitlines())
    assert ranks == [["rank", "0", "of", "2"], ["rank", "1", "of", "2"]], r.stdout


def test_eight_tasks_on_two_cores(slurm):
    r = slurm.run(["srun", "--ntasks=8", "hostname"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [slurm.node_names[0]] * 8


def test_scancel_running_job(slurm):
    job = slurm.sbatch("--wrap", "sleep 300")
    assert slurm.wait_job_state(job, ["RUNNING"], timeout=30) == "RUNNING"
    r = slurm.run(["scancel", job])
    assert r.returncode == 0, r.stderr
    assert slurm.wait_job_gone(job, timeout=30) == "CANCELLED"


def test_time_over_partition_max_refused(slurm):
    r = slurm.run(["sbatch", "-p", "short", "--time=5", "--wrap", "true"])
    assert r.returncode != 0
    assert "Requested time limit is invalid" in r.stderr, r.stderr
    assert slurm.squeue() == []


def test_unknown_partition_refused(slurm):
    r = slurm.run(["sbatch", "-p", "nosuchpartition", "--wrap", "true"])
    assert r.returncode != 0
    assert "invalid partition specified: nosuchpartition" in r.stderr, r.stderr


def test_two_nodes_one_step(slurm_two_nodes):
    s = slurm_two_nodes
    r = s.run(["srun", "-N2", "hostname"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == ["nodeA", "nodeB"]
    r = s.run(["srun", "--mpi=pmix", "-N2", "-n", "4", "/usr/bin/python3", "-c", MPI_HELLO],
              timeout=60)
    assert r.returncode == 0, r.stderr
    hosts = sorted(line.split()[4] for line in r.stdout.splitlines())
    assert len(hosts) == 4 and set(hosts) == {"nodeA", "nodeB"}, r.stdout
