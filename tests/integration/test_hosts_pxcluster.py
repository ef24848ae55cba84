"""``pxcluster start --hostfile`` and ``pxcluster check`` across real hosts (network namespaces
with their own hostname, /etc/hosts and sshd: ``hosts.py``).

pxcluster runs ON nodeA (the root namespace cannot reach the nodes), as a user would run it
on a login node: ``/usr/bin/python3 -m pxfabric start -n 4 --hostfile HF --mpi-args ...`` with
a hostfile of nodeA and nodeB, then the stock client on nodeA. The bad inputs each take a
few seconds: a host whose sshd is down, a wrong key, an unplugged host, a name no /etc/hosts
knows, a pxengine path that does not exist, and a controller forced onto 127.0.0.1 while the
ranks run on nodeB. After each start/stop, nothing of ours may be left in any node's namespace.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[2]
PXENGINE = REPO / "build" / "bin" / "pxengine"
PXCONTROLLER = REPO / "build" / "bin" / "pxcontroller"

HOSTS = ("nodeA", "nodeB")
START_TIMEOUT = 60      # pxcluster's own --timeout (2 busy cores)
CLI_TIMEOUT = START_TIMEOUT + 40

pytestmark = pytest.mark.skipif(
    not (os.access(PXENGINE, os.X_OK) and os.access(PXCONTROLLER, os.X_OK)),
    reason="build/bin/pxengine and build/bin/pxcontroller are needed (bash scripts/build.sh)")


# ---------------------------------------------------------------------------------- helpers

def _env(hosts, extra=None) -> dict:
    env = {
        "PYTHONPATH": str(REPO / "python"),
        "IPYTHONDIR": str(hosts.workdir / "ipython"),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "OMPI_MCA_mpi_yield_when_idle": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(extra or {})
    return env


def pxcluster(hosts, *args, node="nodeA", timeout=CLI_TIMEOUT, env=None):
    """``python3 -m pxfabric ARGS`` on ``node`` (what scripts/pxcluster runs)."""
    return hosts[node].run([PYTHON, "-m", "pxfabric", *[str(a) for a in args]],
                           timeout=timeout, env=_env(hosts, env), cwd=str(hosts.workdir))


def mpi_args(hosts) -> str:
    return shlex.join(hosts.mpirun_args())


def leftovers(hosts) -> dict:
    """Processes in each node's namespaces other than its holder and sshd: what a run left."""
    out = {}
    for name, node in hosts.nodes.items():
        r = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True,
                           timeout=10)
        keep = {node.pid, node.sshd_pid}
        pids = [int(t) for t in r.stdout.split() if t.isdigit() and int(t) not in keep]
        rows = []
        for pid in pids:
            try:
                rows.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()}"[:160])
            except OSError:
                pass
        if rows:
            out[name] = rows
    return out


def wait_no_leftovers(hosts, timeout=15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(hosts)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def profile_dir(hosts, name: str) -> Path:
    return hosts.workdir / name


def stop_quietly(hosts, pdir: Path) -> None:
    """Teardown: stop a cluster if its state file is still there (never raises)."""
    if (pdir / "security" / "pxcluster-default.json").exists():
        try:
            pxcluster(hosts, "stop", "--profile-dir", pdir, timeout=60)
        except Exception:  # noqa: BLE001 - hosts.close() stops whatever is left by PID
            pass


CLIENT_CODE = r"""
import json, socket, sys
import ipyparallel as ipp

rc = ipp.Client(profile_dir=sys.argv[1])
rc.wait_for_engines(4, timeout=30)
ids = sorted(rc.ids)
dv = rc[ids]
out = {"ids": ids}
out["hosts"] = dv.apply_sync(socket.gethostname)
# what %px sends: an execute_request to every engine
dv.execute("from mpi4py import MPI; r = MPI.COMM_WORLD.allreduce(1); "
           "import socket; h = socket.gethostname()", block=True)
out["allreduce"] = dv["r"]
bv = rc.broadcast_view()
out["broadcast"] = bv.apply_sync(lambda x: x + 1, 41)
lv = rc.load_balanced_view()
out["lbmap"] = lv.map_sync(lambda x: x * x, range(12))
out["lbhosts"] = sorted(set(lv.map_sync(lambda _: __import__("socket").gethostname(), range(16))))
rc.close()
print("RESULT", json.dumps(out), flush=True)
"""


# ------------------------------------------------------------------------------------ tests

def test_hostfile_start_two_nodes(hosts):
    """start -n 4 over nodeA:2 + nodeB:2: ranks on both, allreduce, broadcast, LB map; list
    shows the hosts; stop leaves nothing on either node."""
    hf = REPO / "hostfiles" / "two-nodes"      # the shipped example: nodeA slots=2, nodeB slots=2
    pdir = profile_dir(hosts, "prof-two")
    try:
        r = pxcluster(hosts, "start", "-n", 4, "--profile-dir", pdir, "--hostfile", hf,
                      "--mpi-args", mpi_args(hosts), "--timeout", START_TIMEOUT)
        assert r.returncode == 0, f"start failed:\n{r.stdout}\n{r.stderr}"
        # the address it chose, and why; where each rank runs
        assert f"listens for engines on {hosts['nodeA'].ip}" in r.stdout, r.stdout
        assert "routes to nodeB" in r.stdout, r.stdout
        assert "4 engines: nodeA (ranks 0-1), nodeB (ranks 2-3)" in r.stdout, r.stdout
        assert "-x IPP_CONNECTION_INFO" in r.stdout, r.stdout

        c = hosts["nodeA"].run([PYTHON, "-c", CLIENT_CODE, str(pdir)], timeout=90,
                               env=_env(hosts))
        rows = [ln[7:] for ln in c.stdout.splitlines() if ln.startswith("RESULT ")]
        assert c.returncode == 0 and rows, f"client failed:\n{c.stdout}\n{c.stderr}"
        out = json.loads(rows[0])
        assert out["ids"] == [0, 1, 2, 3]
        assert out["hosts"] == ["nodeA", "nodeA", "nodeB", "nodeB"]
        assert out["allreduce"] == [4, 4, 4, 4]
        assert out["broadcast"] == [42, 42, 42, 42]
        assert out["lbmap"] == [x * x for x in range(12)]
        assert out["lbhosts"] == ["nodeA", "nodeB"]

        ls = pxcluster(hosts, "list", "--profile-dir", pdir, timeout=30)
        assert ls.returncode == 0, ls.stderr
        assert "nodeA (ranks 0-1), nodeB (ranks 2-3)" in ls.stdout and "4/4" in ls.stdout, \
            ls.stdout
        lj = pxcluster(hosts, "list", "--profile-dir", pdir, "--json", timeout=30)
        row = json.loads(lj.stdout)[0]
        assert [(g["host"], g["ranks"]) for g in row["hosts"]] == \
            [("nodeA", [0, 1]), ("nodeB", [2, 3])]
        assert row["status"] == "running"
        state = json.loads((pdir / "security" / "pxcluster-default.json").read_text())
        assert state["controller_address"] == hosts["nodeA"].ip
        assert "nodeB" in {g["host"] for g in state["hosts"]}

        s = pxcluster(hosts, "stop", "--profile-dir", pdir, timeout=60)
        assert s.returncode == 0, f"{s.stdout}\n{s.stderr}"
        left = wait_no_leftovers(hosts)
        assert not left, f"left running after stop: {left}"
    finally:
        stop_quietly(hosts, pdir)


def test_check_ok_and_missing_pxengine(hosts):
    """check passes on good hosts; with PXF_ENGINE pointing nowhere every host says so."""
    hf = hosts.write_hostfile(hosts.workdir / "hf-ok", {"nodeA": 2, "nodeB": 2})
    r = pxcluster(hosts, "check", "--hostfile", hf, "--mpi-args", mpi_args(hosts),
                  "--timeout", 30, timeout=60)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    lines = r.stdout.splitlines()
    assert any(ln.startswith("nodeA: OK") for ln in lines), r.stdout
    assert any(ln.startswith("nodeB: OK") and f"{hosts['nodeA'].ip} reachable" in ln
               for ln in lines), r.stdout

    missing = "/nonexistent/pxfabric/bin/pxengine"
    r = pxcluster(hosts, "check", "--hostfile", hf, "--mpi-args", mpi_args(hosts),
                  "--timeout", 30, timeout=60, env={"PXF_ENGINE": missing})
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    for node in ("nodeA", "nodeB"):
        assert f"{node}: pxengine not found at {missing}" in r.stdout, r.stdout
    assert "set PXF_ENGINE" in r.stdout


def test_check_ssh_failures(hosts, tmp_path):
    """sshd down -> 'refused'; a key nodeB does not know -> login refused; unplugged ->
    unreachable. Each names the host and what to change, within its timeout."""
    hf = hosts.write_hostfile(hosts.workdir / "hf-b", {"nodeB": 2})
    node_b = hosts["nodeB"]

    node_b.stop_sshd()
    try:
        r = pxcluster(hosts, "check", "--hostfile", hf, "--mpi-args", mpi_args(hosts),
                      "--timeout", 20, timeout=40)
    finally:
        node_b.start_sshd()
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    assert "nodeB: ssh connection refused" in r.stdout and "Connection refused" in r.stdout, \
        r.stdout
    assert "start sshd on nodeB" in r.stdout

    # a key nodeB's authorized_keys does not have
    key = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                   timeout=10)
    cfg = tmp_path / "ssh_config"
    cfg.write_text(hosts.ssh_config.read_text().replace(str(hosts.workdir / "userkey"), str(key)))
    r = pxcluster(hosts, "check", "--hostfile", hf, "--timeout", 20, timeout=40,
                  env={"OMPI_MCA_plm_rsh_agent": f"ssh -F {cfg}"})
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    assert "nodeB: ssh login refused" in r.stdout and "Permission denied" in r.stdout, r.stdout
    assert "authorized_keys" in r.stdout

    node_b.unplug()
    try:
        t0 = time.monotonic()
        r = pxcluster(hosts, "check", "--hostfile", hf, "--mpi-args", mpi_args(hosts),
                      "--timeout", 20, timeout=40)
        took = time.monotonic() - t0
    finally:
        node_b.plug()
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    assert "nodeB: unreachable (" in r.stdout, r.stdout
    assert took < 20, took       # ConnectTimeout=5, not ssh's default


def test_start_refused_login_names_the_host(hosts, tmp_path):
    """mpirun cannot log in to nodeB (a key nodeB does not know): the start fails at once,
    says nodeB and 'login refused' (the host check run after the failure) with mpirun's own
    lines, and leaves nothing running."""
    hf = hosts.write_hostfile(hosts.workdir / "hf-ab", {"nodeA": 1, "nodeB": 1})
    key = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                   timeout=10)
    cfg = tmp_path / "ssh_config"
    cfg.write_text(hosts.ssh_config.read_text().replace(str(hosts.workdir / "userkey"), str(key)))
    args = ["--mca", "plm_rsh_agent", f"ssh -F {cfg}"] + hosts.mpirun_args()[3:]
    pdir = profile_dir(hosts, "prof-refused")
    try:
        r = pxcluster(hosts, "start", "-n", 2, "--profile-dir", pdir, "--hostfile", hf,
                      "--mpi-args", shlex.join(args), "--timeout", 40, timeout=80)
        assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
        err = r.stderr
        assert "nodeB: ssh login refused" in err and "Permission denied" in err, err
        assert "nodeA: OK" in err, err
        assert "ORTE was unable to reliably start" in err, err      # mpirun's own words
        assert not (pdir / "security" / "pxcluster-default.json").exists()
        left = wait_no_leftovers(hosts)
        assert not left, f"left running after a failed start: {left}"
    finally:
        stop_quietly(hosts, pdir)


def test_unknown_host(hosts):
    """A name no /etc/hosts knows: check says which host and line; start refuses before
    starting anything."""
    hf = hosts.workdir / "hf-unknown"
    hf.write_text("# two nodes, one misspelt\nnodeA slots=2\nnodeQ slots=2\n")
    r = pxcluster(hosts, "check", "--hostfile", hf, "--mpi-args", mpi_args(hosts),
                  "--timeout", 20, timeout=40, env={"PXF_ENGINE": "/nonexistent/pxengine"})
    assert r.returncode == 1
    assert "nodeQ: nodeQ does not resolve" in r.stdout and "line 3" in r.stdout, r.stdout

    pdir = profile_dir(hosts, "prof-unknown")
    t0 = time.monotonic()
    r = pxcluster(hosts, "start", "-n", 4, "--profile-dir", pdir, "--hostfile", hf,
                  "--mpi-args", mpi_args(hosts), "--timeout", START_TIMEOUT, timeout=60)
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    assert time.monotonic() - t0 < 15
    assert "nodeQ does not resolve" in r.stderr and "line 3" in r.stderr, r.stderr
    assert "controller started" not in r.stdout
    assert not (pdir / "security" / "pxcluster-default.json").exists()
    assert not wait_no_leftovers(hosts, 1)


def test_controller_on_loopback_ranks_elsewhere(hosts):
    """--ip=127.0.0.1 while the ranks run on nodeB: pxcluster warns at once, fails within its
    timeout with the rank's own `cannot reach the controller` and the host check naming
    nodeB, and leaves nothing running on either node."""
    hf = hosts.write_hostfile(hosts.workdir / "hf-b-only", {"nodeB": 2})
    pdir = profile_dir(hosts, "prof-loopback")
    try:
        t0 = time.monotonic()
        r = pxcluster(hosts, "start", "-n", 2, "--profile-dir", pdir, "--hostfile", hf,
                      "--mpi-args", mpi_args(hosts), "--controller-args=--ip=127.0.0.1",
                      "--engine-args=--IPEngine.timeout=3", "--timeout", 40, timeout=80)
        took = time.monotonic() - t0
        assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
        assert took < 45, took
        err = r.stderr
        assert "warning: the controller listens for engines on 127.0.0.1 only" in err, err
        assert "cannot reach the controller at tcp://127.0.0.1:" in err, err
        assert "nodeB: cannot reach the controller address 127.0.0.1:" in err, err
        assert not (pdir / "security" / "pxcluster-default.json").exists()
        left = wait_no_leftovers(hosts)
        assert not left, f"left running after a failed start: {left}"
    finally:
        stop_quietly(hosts, pdir)
