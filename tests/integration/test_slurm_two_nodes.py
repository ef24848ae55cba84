"""``pxcluster start --slurm --nodes 2`` on a two-node Slurm (``slurm.py`` on the namespaced
hosts of ``hosts.py``: slurmctld + slurmd on nodeA, slurmd on nodeB, each node with its own
hostname, /etc/hosts and address 10.200.0.x). pxcluster and the stock client run on nodeA (the
login node here; the root namespace cannot reach the nodes). The job's controller listens on its
node's address, the ranks of both nodes are one MPI job (srun --mpi=pmix), and rank 0 bridges
to the controller.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[2]
PXENGINE = REPO / "build" / "bin" / "pxengine"
PXCONTROLLER = REPO / "build" / "bin" / "pxcontroller"

SLURM_NODES = ("nodeA", "nodeB")
SUBNET = "10.200.0.0/24"

pytestmark = pytest.mark.skipif(
    not (os.access(PXENGINE, os.X_OK) and os.access(PXCONTROLLER, os.X_OK)),
    reason="build/bin/pxengine and build/bin/pxcontroller are needed (bash scripts/build.sh)")


@pytest.mark.timeout(180)
def test_two_nodes_one_mpi_job(slurm):
    ipydir = slurm.workdir / "ipython"
    env = {"PYTHONPATH": str(REPO / "python"), "IPYTHONDIR": str(ipydir),
           "PYTHONDONTWRITEBYTECODE": "1",
           # ranks of different nodes talk over the LAN only (Open MPI's TCP BTL)
           "OMPI_MCA_btl_tcp_if_include": SUBNET, "OMPI_MCA_oob_tcp_if_include": SUBNET}
    r = slurm.run([PYTHON, "-m", "pxfabric", "start", "-n", "4", "--slurm", "--nodes", "2",
                   "--time", "10", "--timeout", "90"], env=env, timeout=130)
    assert r.returncode == 0, r.stdout + r.stderr + slurm.logs()
    job = r.stdout.split("submitted job ")[1].split()[0]
    assert "(2 nodes, 4 ranks, walltime 10)" in r.stdout
    assert f"job {job} running on nodeA,nodeB; 4/4 engines registered" in r.stdout, r.stdout
    try:
        code = textwrap.dedent(f"""
            import ipyparallel as ipp, json
            rc = ipp.Client(profile_dir={str(ipydir / 'profile_default')!r}, timeout=30)
            rc.wait_for_engines(4, timeout=30)
            def where():
                import socket
                from mpi4py import MPI
                c = MPI.COMM_WORLD
                return socket.gethostname(), c.rank, c.allreduce(c.rank)
            print(json.dumps(rc[:].apply_sync(ipp.interactive(where))))
            rc.close()
        """)
        c = slurm.login_node.python(code, timeout=60, env=env)
        assert c.returncode == 0, c.stderr
        got = json.loads(c.stdout.strip().splitlines()[-1])
        assert sorted({h for h, _, _ in got}) == ["nodeA", "nodeB"], got
        assert sorted(rank for _, rank, _ in got) == [0, 1, 2, 3]
        assert {s for _, _, s in got} == {6}
        r2 = slurm.run([PYTHON, "-m", "pxfabric", "list", "--json"], env=env)
        (row,) = json.loads(r2.stdout)
        assert row["nodes"] == "nodeA,nodeB" and row["engines_registered"] == 4
    finally:
        s = slurm.run([PYTHON, "-m", "pxfabric", "stop"], env=env, timeout=90)
    assert s.returncode == 0, s.stdout + s.stderr
    assert slurm.job_state(job) == "CANCELLED"
    assert not list((ipydir / "profile_default" / "security").glob("*.json"))
