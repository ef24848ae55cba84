"""Self-test of the namespaced-hosts harness (hosts.py, fixture ``hosts`` in conftest.py):
ssh between nodes, names resolving like on a real cluster, mpirun --hostfile over ssh."""

from __future__ import annotations

import json
import os

HOSTS = ("nodeA", "nodeB", "nodeC")   # three nodes: the harness's "extra node" mode

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}


def test_ssh_between_nodes(hosts):
    names = hosts.names
    for src, dst in zip(names, names[1:] + names[:1]):
        r = hosts[src].ssh(dst, "hostname; readlink /proc/self/ns/net; echo $OMPI_ALLOW_RUN_AS_ROOT",
                           timeout=30)
        assert r.returncode == 0, f"ssh {src} -> {dst}: rc {r.returncode}\n{r.stderr}"
        host, netns, allow = r.stdout.split()
        assert host == dst
        assert allow == "1"                      # sshd's SetEnv
        here = hosts[src].run(["readlink", "/proc/self/ns/net"], timeout=10).stdout.strip()
        assert netns != here                     # really another network namespace


def test_names_resolve_and_files_shared(hosts, tmp_path):
    marker = tmp_path / "marker"
    marker.write_text("shared")
    code = ("import json, os, socket, sys; "
            "print(json.dumps([socket.gethostname(), os.getcwd(), open(sys.argv[1]).read(), "
            "{n: socket.gethostbyname(n) for n in sys.argv[2:]}]))")
    want = {n: hosts[n].ip for n in hosts.names}
    for name in hosts.names:
        r = hosts[name].run(["/usr/bin/python3", "-c", code, str(marker), *hosts.names],
                            timeout=30, cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr
        host, cwd, text, resolved = json.loads(r.stdout)
        assert host == name
        assert cwd == str(tmp_path)              # same /tmp files, cwd carried into the node
        assert text == "shared"
        assert resolved == want
        addrs = hosts[name].run(["ip", "-4", "-o", "addr", "show"], timeout=10).stdout
        assert f"inet {hosts[name].ip}/24" in addrs and "inet 127.0.0.1/8" in addrs
        assert addrs.count(" inet ") == 2        # only lo and eth0
    assert os.uname().nodename not in hosts.names   # the root namespace is untouched


def test_mpirun_hostfile_over_ssh(hosts):
    hostfile = hosts.write_hostfile(hosts.workdir / "hostfile", {"nodeA": 2, "nodeB": 2})
    # Rank 0 prints for all: mpirun's merged stdout may split one rank's line around another's.
    code = ("from mpi4py import MPI; import json, socket; c = MPI.COMM_WORLD; "
            "rows = c.gather([c.rank, socket.gethostname(), c.allreduce(c.rank + 1)]); "
            "c.rank == 0 and print('ROWS', json.dumps(rows), flush=True)")
    r = hosts["nodeA"].run(["mpirun", "--hostfile", str(hostfile), "-n", "4",
                            *hosts.mpirun_args(), "/usr/bin/python3", "-c", code],
                           timeout=90, env=MPI_ENV)
    assert r.returncode == 0, f"mpirun rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    rows = [json.loads(line[5:]) for line in r.stdout.splitlines() if line.startswith("ROWS ")]
    assert rows == [[[0, "nodeA", 10], [1, "nodeA", 10], [2, "nodeB", 10], [3, "nodeB", 10]]], \
        r.stdout
