"""From a laptop: ``pxcluster connect`` (pxtunnel: one libssh session) and the stock client.

Hosts (network namespaces, ``hosts.py``): nodeA is the login + compute node, running
``pxcontroller --ip=127.0.0.1`` (clients on loopback only) and a 2-rank pxengine job
(``mpirun`` on nodeA, no hostfile); nodeC is the laptop. On nodeC, ``pxcluster connect
root@nodeA -F <ssh config> --remote-profile-dir <controller's profile>`` starts pxtunnel, and
the stock client, ``ipp.Client(profile='nodeA')`` with no ``sshserver=``, does a direct apply,
an LB map, a broadcast view, a ``%px`` allreduce and a 100 MB push; the SSH connection is then killed (the sshd
process serving it on nodeA, found by its TCP connection, by PID), pxtunnel reconnects and the
same client keeps working; ``pxcluster disconnect`` leaves no pxtunnel and no local file.

Bad input (pxtunnel run directly on nodeC, each a second or less): an unknown host key (refused
with the fingerprint, nothing recorded), a changed host key (refused even with
``--accept-new-host-key``), no connection file on the host (through ``pxcluster connect``: no
process or state left), a refused login (a key nodeA does not accept), nothing listening on
the SSH port.

``PXF_PXTUNNEL`` points at another pxtunnel binary (default build/bin/pxtunnel).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[2]
PXENGINE = Path(os.environ.get("PXF_PXENGINE") or REPO / "build" / "bin" / "pxengine")
PXCONTROLLER = Path(os.environ.get("PXF_PXCONTROLLER") or REPO / "build" / "bin" / "pxcontroller")
PXTUNNEL = Path(os.environ.get("PXF_PXTUNNEL") or REPO / "build" / "bin" / "pxtunnel")

HOSTS = ("nodeA", "nodeB", "nodeC")
STOP_GRACE = 5.0

pytestmark = pytest.mark.skipif(
    not all(os.access(p, os.X_OK) for p in (PXENGINE, PXCONTROLLER, PXTUNNEL)),
    reason=f"{PXENGINE}, {PXCONTROLLER} and {PXTUNNEL} are needed (bash scripts/build.sh; "
           "pxtunnel needs libssh-dev)")


def wait_until(pred, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def stop_pid(pid: int, grace: float = STOP_GRACE) -> None:
    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return
    for p in procs[:1]:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs[:1], timeout=grace)
    rest = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in rest:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(rest, timeout=grace)


def netns_pids(node) -> "list[int]":
    r = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True,
                       timeout=10)
    return [int(t) for t in r.stdout.split() if t.isdigit()]


def laptop_env(hosts, extra=None) -> dict:
    env = {"PYTHONPATH": str(REPO / "python"), "IPYTHONDIR": str(hosts.workdir / "laptop_ipython"),
           "PXF_TUNNEL": str(PXTUNNEL), "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra or {})
    return env


def pxcluster(hosts, *args, timeout=60):
    return hosts["nodeC"].run([PYTHON, "-m", "pxfabric", *map(str, args)], timeout=timeout,
                              env=laptop_env(hosts), cwd=str(hosts.workdir))


def tunnel(hosts, *args, timeout=30, env=None):
    return hosts["nodeC"].run([str(PXTUNNEL), *map(str, args)], timeout=timeout,
                              env=laptop_env(hosts, env), cwd=str(hosts.workdir))


@pytest.fixture(scope="module")
def remote(hosts):
    """pxcontroller (loopback only) + a 2-rank pxengine job, both on nodeA."""
    A = hosts["nodeA"]
    wd = hosts.workdir
    prof = wd / "remote_profile"
    env = {"PYTHONPATH": str(REPO / "python"), "PYTHONUNBUFFERED": "1",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}
    started = []
    try:
        with open(wd / "controller.log", "wb") as log:
            ctl = A.popen([str(PXCONTROLLER), "--ip=127.0.0.1", f"--profile-dir={prof}"],
                          env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append(ctl)
        client_file = prof / "security" / "ipcontroller-client.json"
        wait_until(lambda: client_file.exists() or ctl.poll() is not None, 20, "the controller")
        assert ctl.poll() is None, (wd / "controller.log").read_text()
        with open(wd / "engines.log", "wb") as log:
            job = A.popen(["mpirun", "-n", "2", *hosts.mpirun_args(), "-x", "PYTHONPATH",
                           str(PXENGINE), f"--profile-dir={prof}"],
                          env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append(job)
        yield {"profile_dir": prof, "client_file": client_file, "controller": ctl, "job": job}
    finally:
        for p in reversed(started):
            stop_pid(p.pid)


CLIENT = r"""
import json, os, socket, sys, time
import numpy as np
import ipyparallel as ipp

out = {}
rc = ipp.Client(profile='nodeA', timeout=20)
rc.wait_for_engines(2, timeout=30)
out["ids"] = rc.ids
dv = rc[:]
out["hosts"] = dv.apply_sync(socket.gethostname)
out["lb"] = rc.load_balanced_view().map_sync(lambda x: x * x, range(8))
out["bcast"] = rc.broadcast_view().apply_sync(lambda: 7)
# the real %px magic, as a laptop IPython session would run it
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
dv.activate()
shell.run_line_magic("px", "from mpi4py import MPI; r = MPI.COMM_WORLD.allreduce(MPI.COMM_WORLD.rank + 1)")
out["px_r"] = dv.pull("r", block=True)
a = np.arange(100 * 1024 * 1024 // 8, dtype=np.float64)
t = time.monotonic()
dv.push({"a": a}, block=True)
out["push_s"] = round(time.monotonic() - t, 2)
out["sums"] = dv.apply_sync(lambda: float(globals()["a"].sum()))
out["expect"] = float(a.sum())
print(json.dumps(out), flush=True)
# The SSH connection is killed now; the same client must work after pxtunnel reconnects.
open(sys.argv[1], "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
t = time.monotonic()
after = {"apply": dv.apply_sync(lambda: 41 + 1),
         "lb": rc.load_balanced_view().map_sync(lambda x: -x, range(4))}
after["after_s"] = round(time.monotonic() - t, 2)
print(json.dumps(after), flush=True)
rc.close()
"""


def _ss(node, filt: str) -> "list[tuple[str, str, list[int]]]":
    """Established TCP connections on ``node`` matching ``filt``: (local, peer, pids)."""
    r = node.run(["ss", "-tnpH", "state", "established", filt], timeout=10)
    out = []
    for line in r.stdout.splitlines():
        f = line.split()
        if len(f) >= 4:
            out.append((f[2], f[3], [int(x) for x in re.findall(r"pid=(\d+)", line)]))
    return out


def ssh_server_pids(hosts, tunnel_pid: int) -> "list[int]":
    """The sshd processes on nodeA holding pxtunnel's SSH connection (matched by its TCP
    ports, seen with ``ss`` inside each node's namespace)."""
    mine = [local for local, peer, pids in _ss(hosts["nodeC"], "( dport = :22 )")
            if tunnel_pid in pids]
    assert len(mine) == 1, f"pxtunnel should hold one SSH connection, has {mine}"
    out = []
    for local, peer, pids in _ss(hosts["nodeA"], "( sport = :22 )"):
        if peer == mine[0]:
            out += [p for p in pids if p not in (hosts["nodeA"].pid, hosts["nodeA"].sshd_pid)]
    return out


def test_laptop_drives_cluster_through_one_ssh_session(hosts, remote):
    C = hosts["nodeC"]
    wd = hosts.workdir
    remote_info = json.loads(remote["client_file"].read_text())
    # A local port already taken: pxtunnel uses another one.
    squat = C.popen([PYTHON, "-c", "import socket,time; s=socket.socket(); s.bind(('127.0.0.1', "
                     f"{remote_info['registration']})); s.listen(); time.sleep(120)"])
    C.wait_port(remote_info["registration"], 10, squat, ip="127.0.0.1")
    known = wd / "laptop_known_hosts"
    t0 = time.monotonic()
    r = pxcluster(hosts, "connect", "root@nodeA", "-F", hosts.ssh_config,
                  "--remote-profile-dir", remote["profile_dir"], "--known-hosts", known,
                  "--accept-new-host-key")
    print(f"\npxcluster connect {time.monotonic() - t0:.2f}s")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Connect with: rc = ipp.Client(profile='nodeA')" in r.stdout, r.stdout
    assert "forwarding 7 ports of nodeA:" in r.stdout, r.stdout
    assert known.read_text().startswith("nodea ssh-ed25519 ")   # recorded (ssh lowercases)
    ipy = wd / "laptop_ipython" / "profile_nodeA"
    state = json.loads((ipy / "security" / "pxtunnel-default.json").read_text())
    local_file = ipy / "security" / "ipcontroller-client.json"
    local = json.loads(local_file.read_text())
    assert local["key"] == remote_info["key"]
    assert local["interface"] == "tcp://127.0.0.1" and local["ssh"] == ""
    assert local["curve_serverkey"] == remote_info.get("curve_serverkey")
    assert local["registration"] != remote_info["registration"]   # that one was taken
    squat.kill()
    log = Path(state["log"])
    try:
        _drive_and_disconnect(hosts, state, log, local_file, ipy)
    finally:
        stop_pid(state["pid"])   # only if a failure left it running


def _drive_and_disconnect(hosts, state, log, local_file, ipy):
    C = hosts["nodeC"]
    wd = hosts.workdir

    marker, go = wd / "client_phase1", wd / "client_go"
    with open(wd / "laptop_client.log", "wb") as out:
        client = C.popen([PYTHON, "-c", CLIENT, marker, go], env=laptop_env(hosts),
                         stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: marker.exists() or client.poll() is not None, 60, "the client")
        text = (wd / "laptop_client.log").read_text()
        assert marker.exists(), text + log.read_text()
        first = json.loads(text.strip().splitlines()[-1])
        assert first["ids"] == [0, 1]
        assert first["hosts"] == ["nodeA", "nodeA"]
        assert first["lb"] == [x * x for x in range(8)]
        assert first["bcast"] == [7, 7]
        assert first["px_r"] == [3, 3]  # %px through the tunnel: an allreduce over both ranks
        assert first["sums"] == [first["expect"]] * 2

        # Kill the SSH connection on the server side; pxtunnel reconnects.
        victims = ssh_server_pids(hosts, state["pid"])
        assert victims, "no sshd process found for pxtunnel's connection"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: "reconnected to" in log.read_text(), 20, "pxtunnel to reconnect")
        assert ssh_server_pids(hosts, state["pid"]), "no new SSH connection"
        go.touch()
        client.wait(40)
        lines = (wd / "laptop_client.log").read_text().strip().splitlines()
        assert client.returncode == 0, "\n".join(lines[-20:]) + log.read_text()
        after = json.loads(lines[-1])
        assert after["apply"] == [42, 42] and after["lb"] == [0, -1, -2, -3]
    finally:
        if client.poll() is None:
            stop_pid(client.pid)
    print(f"\n100 MB push {first['push_s']}s, "
          f"first call after reconnect {after['after_s']}s")

    r = pxcluster(hosts, "disconnect", "nodeA")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stopped" in r.stdout and "stale" not in r.stdout, r.stdout
    assert not psutil.pid_exists(state["pid"]) or \
        psutil.Process(state["pid"]).status() == psutil.STATUS_ZOMBIE
    assert not local_file.exists()
    assert not (ipy / "security" / "pxtunnel-default.json").exists()
    assert PXTUNNEL.name not in " ".join(
        " ".join(psutil.Process(p).cmdline()) for p in netns_pids(C) if psutil.pid_exists(p))


def _no_tunnel_left(hosts, local_dir: Path):
    assert not list(local_dir.glob("**/ipcontroller*.json")), list(local_dir.glob("**/*"))
    left = []
    for p in netns_pids(hosts["nodeC"]):
        try:
            if PXTUNNEL.name in " ".join(psutil.Process(p).cmdline()):
                left.append(p)
        except psutil.Error:
            pass
    assert not left, f"pxtunnel processes left: {left}"


def test_bad_input(hosts, remote):
    wd = hosts.workdir
    prof = remote["profile_dir"]
    local = wd / "bad_local"
    common = ["--remote-profile-dir", prof, "--local-profile-dir", local, "--connect-timeout", 5]

    # Unknown host key, no --accept-new-host-key: refused, fingerprint shown, nothing recorded.
    kh = wd / "bad_known_hosts"
    kh.write_text("")
    r = tunnel(hosts, "root@nodeA", "-F", hosts.ssh_config, "--known-hosts", kh, *common)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "host key of root@nodeA is unknown" in r.stderr and "SHA256:" in r.stderr, r.stderr
    assert str(kh) in r.stderr and "--accept-new-host-key" in r.stderr
    assert kh.read_text() == ""
    _no_tunnel_left(hosts, local)

    # A changed host key: refused, even with --accept-new-host-key.
    other = wd / "other_hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True,
                   timeout=10)
    kh.write_text("nodea " + " ".join(Path(f"{other}.pub").read_text().split()[:2]) + "\n")
    r = tunnel(hosts, "root@nodeA", "-F", hosts.ssh_config, "--known-hosts", kh,
               "--accept-new-host-key", *common)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "has CHANGED" in r.stderr and "SHA256:" in r.stderr and str(kh) in r.stderr, r.stderr
    _no_tunnel_left(hosts, local)

    # Refused login: a key nodeA does not accept, no agent.
    good_kh = wd / "laptop_known_hosts2"
    cfg = wd / "wrongkey_ssh_config"
    cfg.write_text("Host *\n  User root\n  IdentitiesOnly yes\n")
    r = tunnel(hosts, "root@nodeA", "-F", cfg, "-i", other, "--known-hosts", good_kh,
               "--accept-new-host-key", *common, env={"SSH_AUTH_SOCK": ""})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "login to root@nodeA refused" in r.stderr and "-i KEY" in r.stderr, r.stderr
    _no_tunnel_left(hosts, local)

    # Nothing listens on the SSH port.
    r = tunnel(hosts, "root@nodeA", "-p", 2222, "-F", hosts.ssh_config, "--known-hosts", good_kh,
               *common)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot connect to root@nodeA" in r.stderr, r.stderr
    _no_tunnel_left(hosts, local)

    # A jump host that refuses the login: named, with its ssh's own words; nothing left.
    r = tunnel(hosts, "root@nodeA", "-F", hosts.ssh_config, "-J", "nobody@nodeB",
               "--known-hosts", good_kh, *common)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot connect to root@nodeA through the jump host nobody@nodeB" in r.stderr, r.stderr
    assert "Permission denied" in r.stderr and "ssh -J nobody@nodeB" in r.stderr, r.stderr
    assert not list(Path("/tmp").glob("pxtunnel-jump-*"))
    _no_tunnel_left(hosts, local)

    # No connection file there (through pxcluster connect): clear message, nothing left.
    r = pxcluster(hosts, "connect", "root@nodeA", "-F", hosts.ssh_config, "--known-hosts",
                  good_kh, "--remote-profile-dir", wd / "no_such_profile", "--as", "nofile")
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"no connection file at nodeA:{wd / 'no_such_profile'}/security/"
            "ipcontroller-client.json: is the controller running there") in r.stderr, r.stderr
    nofile = wd / "laptop_ipython" / "profile_nofile"
    assert not (nofile / "security" / "pxtunnel-default.json").exists()
    _no_tunnel_left(hosts, nofile)


def test_jump_host_and_controller_stop(hosts, remote):
    """``--jump nodeB`` (ProxyJump: the SSH connection to nodeA goes through nodeB); when the
    controller stops (its connection file goes), pxtunnel exits by itself and removes its local
    file; ``disconnect`` then only clears the record. Runs last: it stops the controller."""
    wd = hosts.workdir
    r = pxcluster(hosts, "connect", "root@nodeA", "-F", hosts.ssh_config, "--jump", "root@nodeB",
                  "--remote-profile-dir", remote["profile_dir"], "--as", "viaB",
                  "--known-hosts", wd / "jump_known_hosts", "--accept-new-host-key")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Connect with: rc = ipp.Client(profile='viaB')" in r.stdout, r.stdout
    ipy = wd / "laptop_ipython" / "profile_viaB"
    state = json.loads((ipy / "security" / "pxtunnel-default.json").read_text())
    local_file = ipy / "security" / "ipcontroller-client.json"
    try:
        # The laptop's only SSH connection of this tunnel goes to nodeB (the `ssh -W` child).
        kids = {c.pid for c in psutil.Process(state["pid"]).children(recursive=True)}
        peers = [peer for _, peer, pids in _ss(hosts["nodeC"], "( dport = :22 )")
                 if state["pid"] in pids or kids & set(pids)]
        assert peers == [f"{hosts['nodeB'].ip}:22"], peers
        r = hosts["nodeC"].python(
            "import ipyparallel as ipp; rc = ipp.Client(profile='viaB', timeout=20); "
            "rc.wait_for_engines(2, timeout=20); print(rc[:].apply_sync(lambda: 5))",
            env=laptop_env(hosts), timeout=60)
        assert r.returncode == 0 and "[5, 5]" in r.stdout, r.stdout + r.stderr

        stop_pid(remote["controller"].pid)
        assert not remote["client_file"].exists()
        wait_until(lambda: not psutil.pid_exists(state["pid"]) or
                   psutil.Process(state["pid"]).status() == psutil.STATUS_ZOMBIE, 15,
                   "pxtunnel to exit after the controller stopped")
        assert not local_file.exists()
        assert "the controller stopped; exiting" in Path(state["log"]).read_text()
    finally:
        stop_pid(state["pid"])
    r = pxcluster(hosts, "disconnect", "viaB")
    assert r.returncode == 0 and "not running" in r.stdout, r.stdout + r.stderr
    assert not (ipy / "security" / "pxtunnel-default.json").exists()
    _no_tunnel_left(hosts, ipy)
