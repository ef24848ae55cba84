"""Several MPI jobs on several hosts, SSH tunnels both ways, and bad input across hosts (issue 12).

Real hosts on one machine (``hosts.py``): nodeA, nodeB, nodeC are network namespaces with their
own hostname, /etc/hosts and sshd on a private LAN (10.200.0.1-3); the filesystem is shared.
Everything is started directly on a node (pxcontroller, ``mpirun`` of pxengine ranks, the stock
``ipyparallel.Client``), never through pxcluster, and stopped by PID.

* two ``mpirun`` jobs on two hosts joined under one controller: distinct ids, hostnames,
  a broadcast to both, each job its own COMM_WORLD, two ``job`` values in
  ``pxf_engines_request``, one job lost alone;
* a collaborator's stock client on nodeC reaching a loopback-only controller on nodeA through
  the ``ssh`` written in the client file (``sshserver=``: the stock client's ssh tunnels);
* engines on nodeB reaching a loopback-only controller through ``--enginessh`` (rank 0's
  ``ssh -N -L`` forward, ``$PXF_SSH`` as a command line), the forward gone with the job;
* bad input: a controller on 127.0.0.1 while ranks run elsewhere, no route / no answer to the
  controller's host, a wrong key, ``--enginessh`` to a host whose sshd is down.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import PXCONTROLLER, PXENGINE, REPO, log_tail, wait_until  # noqa: E402
from pxfabric import processes  # noqa: E402  (stopping by PID, shared with pxcluster and bench/)

HOSTS = ("nodeA", "nodeB", "nodeC")

PYTHON = "/usr/bin/python3"
PYTHONPATH = str(REPO / "python")
# Short enough that every failure below is quick, long enough for a busy 2-core machine.
ENGINE_TIMEOUT = 3
START_TIMEOUT = 60.0          # engines to register (generous: CI machines get busy)
JOB_FAIL_TIMEOUT = 60.0       # a job that must fail: bound on its whole run
STOP_GRACE = 5.0

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}


# --- processes, stopped by PID ----------------------------------------------------------------

def _wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text() or "-"
    except OSError:
        return "?"


class Procs:
    """Processes one test started on the nodes (and their descendants), stopped by PID."""

    def __init__(self) -> None:
        self.popens: List[subprocess.Popen] = []
        self.seen: Dict[int, psutil.Process] = {}

    def add(self, p: subprocess.Popen) -> subprocess.Popen:
        self.popens.append(p)
        self.refresh()
        return p

    def refresh(self) -> None:
        for p in self.popens:
            try:
                root = psutil.Process(p.pid)
                if p.poll() is None:
                    self.seen.setdefault(p.pid, root)
                    for c in root.children(recursive=True):
                        self.seen.setdefault(c.pid, c)
            except psutil.Error:
                pass

    def stop(self, p: subprocess.Popen, grace: float = STOP_GRACE) -> Optional[int]:
        """Stop ``p`` and what it started: SIGTERM to ``p`` first (mpirun takes its ranks down),
        then anything of its subtree still alive. Returns its exit status."""
        self.refresh()
        try:  # a reaped p's PID is no longer ours
            tree = processes.descendants(psutil.Process(p.pid)) if p.poll() is None else []
        except psutil.Error:
            tree = []
        # p alone gets the whole grace to take its subtree down, then all of it: SIGTERM, grace,
        # SIGKILL (by PID); then p is reaped for its status
        processes.terminate(tree, grace, first=tree[:1], first_grace=grace)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        return p.returncode

    def describe(self) -> str:
        """What is running (for failure messages): each process started, its descendants."""
        def one(q: psutil.Process) -> str:
            try:
                with q.oneshot():
                    t = q.cpu_times()
                    return (f"pid {q.pid} {q.status()} wchan={_wchan(q.pid)} "
                            f"cpu={t.user + t.system:.2f}s: {' '.join(q.cmdline())[-120:]}")
            except psutil.Error as e:
                return f"pid {q.pid}: {e!r}"

        lines = []
        for p in self.popens:
            lines.append(f"started pid {p.pid} rc {p.poll()}")
            try:
                root = psutil.Process(p.pid)
                lines += ["  " + one(q) for q in [root] + root.children(recursive=True)]
            except psutil.Error:
                pass
        return "\n".join(lines)

    def close(self) -> None:
        self.refresh()
        for p in reversed(self.popens):
            if p.poll() is None:
                self.stop(p)
        processes.stop_procs(self.seen.values(), STOP_GRACE)
        for p in self.popens:
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None and not f.closed:
                    f.close()


@pytest.fixture
def procs():
    pr = Procs()
    yield pr
    pr.close()


def netns_procs(node, *needles: str) -> List[psutil.Process]:
    """Processes inside ``node``'s network namespace whose command line contains every
    needle (the namespace's own holder and sshd never match an ``ssh -L`` needle)."""
    r = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True,
                       timeout=10)
    out = []
    for tok in r.stdout.split():
        try:
            p = psutil.Process(int(tok))
            cmd = " ".join(p.cmdline())
        except (psutil.Error, ValueError):
            continue
        if all(n in cmd for n in needles) and processes.is_alive(p):
            out.append(p)
    return out


# --- controller, jobs, clients on the nodes ---------------------------------------------------

class Controller:
    def __init__(self, node, workdir: Path, popen: subprocess.Popen, log: Path) -> None:
        self.node, self.workdir, self.popen, self.log = node, workdir, popen, log
        self.profile = workdir / "profile"
        self.client_file = self.profile / "security" / "ipcontroller-client.json"
        self.engine_file = self.profile / "security" / "ipcontroller-engine.json"

    def client_info(self) -> dict:
        return json.loads(self.client_file.read_text())

    def engine_info(self) -> dict:
        return json.loads(self.engine_file.read_text())

    def tail(self) -> str:
        return f"--- controller log {self.log}:\n{log_tail(self.log, 30)}"


def base_env(workdir: Path) -> Dict[str, str]:
    return {**MPI_ENV, "PYTHONPATH": PYTHONPATH, "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1", "IPYTHONDIR": str(workdir / "ipython")}


def start_controller(procs: Procs, node, workdir: Path, *args: str) -> Controller:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "controller.log"
    with open(log, "ab") as out:
        p = procs.add(node.popen([str(PXCONTROLLER), f"--profile-dir={workdir / 'profile'}",
                                  "--ping=500", "--log-level=10", *args],
                                 env=base_env(workdir), stdout=out, stderr=subprocess.STDOUT))
    c = Controller(node, workdir, p, log)

    def ready():
        if p.poll() is not None:
            raise AssertionError(f"pxcontroller exited with {p.returncode}\n{c.tail()}")
        try:
            return "registration" in c.client_info() and "pxf_fabric" in c.engine_info()
        except (OSError, ValueError):
            return False

    wait_until(ready, 20.0, 0.05, "the controller's connection files")
    return c


def job_argv(hosts, n: int, *engine_args: str, export=()) -> List[str]:
    """``mpirun -n N`` of pxengine ranks on the node it is started on (no hostfile)."""
    xs = [a for k in ("PYTHONPATH", "PYTHONUNBUFFERED", *export) for a in ("-x", k)]
    return ["mpirun", "-n", str(n), *hosts.mpirun_args(), *xs, str(PXENGINE), "--log-level=20",
            f"--IPEngine.timeout={ENGINE_TIMEOUT}", *engine_args]


def start_job(procs: Procs, hosts, node, workdir: Path, name: str, n: int, *engine_args: str,
              env=None, export=()) -> "tuple[subprocess.Popen, Path]":
    log = workdir / f"{name}.log"
    with open(log, "ab") as out:
        p = procs.add(node.popen(job_argv(hosts, n, *engine_args, export=export),
                                 env={**base_env(workdir), **(env or {})},
                                 stdout=out, stderr=subprocess.STDOUT))
    return p, log


def run_failing_job(hosts, node, workdir: Path, name: str, *engine_args: str, env=None,
                    export=()) -> "tuple[int, str]":
    """A job that must fail: (exit status, its output). It must end by itself within
    JOB_FAIL_TIMEOUT (``node.run`` stops it and raises TimeoutExpired otherwise)."""
    r = node.run(job_argv(hosts, 2, *engine_args, export=export), timeout=JOB_FAIL_TIMEOUT,
                 env={**base_env(workdir), **(env or {})}, stderr=subprocess.STDOUT)
    out = r.stdout
    (workdir / f"{name}.log").write_text(out)
    return r.returncode, out


# The stock client, long-lived on a node: a tiny line protocol (one JSON-encoded piece of code
# in, one JSON result out) so that a test can act between two calls (kill a job, then look).
_SERVER = r"""
import json, sys, traceback
g = {"__name__": "__main__"}
for line in sys.stdin:
    g.pop("out", None)
    try:
        exec(json.loads(line), g)
        res = {"ok": True, "out": g.get("out")}
    except BaseException:
        res = {"ok": False, "error": traceback.format_exc()}
    sys.stdout.write("RESULT " + json.dumps(res, default=repr) + "\n")
    sys.stdout.flush()
"""


class RemotePython:
    def __init__(self, procs: Procs, node, workdir: Path, env=None, name="client") -> None:
        self.procs = procs
        self.errlog = workdir / f"{name}.err"
        with open(self.errlog, "ab") as err:
            self.p = procs.add(node.popen([PYTHON, "-u", "-c", _SERVER], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=err,
                                          env={**base_env(workdir), **(env or {})}))
        self.buf = b""

    def __call__(self, code: str, timeout: float = 30.0):
        """Run ``code`` there; returns its ``out`` variable (JSON round trip)."""
        self.send(code)
        return self.result(code, timeout)

    def send(self, code: str) -> None:
        """Start running ``code`` there (``result`` waits for it)."""
        self.p.stdin.write((json.dumps(code) + "\n").encode())
        self.p.stdin.flush()

    def result(self, code: str = "", timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no answer within {timeout} s to:\n{code}\n"
                                     f"stderr: {log_tail(self.errlog, 20)}\n"
                                     f"--- processes:\n{self.procs.describe()}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"client exited ({self.p.wait(5)}) running:\n{code}\n"
                                         f"stderr: {log_tail(self.errlog, 30)}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        res = json.loads(line.decode()[len("RESULT "):])
        if not res["ok"]:
            raise AssertionError(f"client code failed:\n{code}\n{res['error']}")
        return res["out"]

    def close_client(self) -> None:
        """Close its ``rc`` if it made one (best effort: the test's own error comes first)."""
        if self.p.poll() is None:
            try:
                self("'rc' in globals() and rc.close()", timeout=10)
            except AssertionError:
                pass


# A signed hub query needs only zmq and jupyter_client's Session (no ipyparallel import).
HUB_PRELUDE = r"""
import json, os, socket, time
import zmq
from jupyter_client.session import Session

def hub_query(url_file, msg_type, host="127.0.0.1", timeout=10):
    info = json.load(open(url_file))
    s = Session(key=info["key"].encode(), signature_scheme=info["signature_scheme"])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(f"tcp://{host}:{info['registration']}")
        s.send(sock, msg_type, content={})
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no reply to {msg_type}")
        _, frames = s.feed_identities(sock.recv_multipart())
        return s.deserialize(frames)["content"]
    finally:
        sock.close()
"""

CLIENT_PRELUDE = HUB_PRELUDE + r"""
import ipyparallel as ipp

def wait_ids(want, timeout):
    deadline = time.monotonic() + timeout
    while True:
        ids = rc.ids
        if ids == want or (isinstance(want, int) and len(ids) == want):
            return ids
        if time.monotonic() > deadline:
            raise TimeoutError(f"engines {ids}, want {want}, after {timeout} s")
        time.sleep(0.05)

def world():
    from mpi4py import MPI
    c = MPI.COMM_WORLD
    return [c.size, c.allreduce(1)]
"""


def wait_engines(c: Controller, n: int, timeout: float = START_TIMEOUT) -> dict:
    """Wait (on the controller's node, asking the hub) until ``n`` engines are registered;
    returns pxf_engines_request's ``engines``."""
    code = HUB_PRELUDE + f"""
deadline = time.monotonic() + {timeout}
while True:
    eng = hub_query({str(c.client_file)!r}, "pxf_engines_request")["engines"]
    if len(eng) >= {n} or time.monotonic() > deadline:
        break
    time.sleep(0.05)
print(json.dumps(eng))
"""
    r = c.node.python(code, timeout=timeout + 15, env=base_env(c.workdir))
    assert r.returncode == 0, f"{r.stderr}\n{c.tail()}"
    eng = json.loads(r.stdout)
    assert len(eng) >= n, f"only {len(eng)} of {n} engines registered after {timeout} s\n{c.tail()}"
    return eng


def ssh_tunnels(node, rports) -> List[psutil.Process]:
    """``ssh ... -L LOCAL:HOST:RPORT`` processes in ``node``'s namespace for these ports."""
    found = []
    for p in netns_procs(node, "ssh", "-L"):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if any(a.rsplit(":", 1)[-1] in {str(r) for r in rports} for a in cmd if a.count(":") >= 2):
            found.append(p)
    return found


# --- 1. two MPI jobs on two systems under one controller ------------------------------------

def test_two_jobs_on_two_hosts(hosts, procs, tmp_path):
    A, B = hosts["nodeA"], hosts["nodeB"]
    c = start_controller(procs, A, tmp_path / "ctl", "--ip=*")
    einfo = c.engine_info()
    assert einfo["interface"] == "tcp://*" and einfo["location"] == "nodeA", einfo
    # Job 1 on nodeA reads the profile; job 2 on nodeB gets the engine file's text in
    # IPP_CONNECTION_INFO and a profile dir with no connection file (no shared files needed).
    job1, log1 = start_job(procs, hosts, A, tmp_path, "job1", 2, f"--profile-dir={c.profile}")
    empty = tmp_path / "profile_nodeB"
    empty.mkdir()
    job2, log2 = start_job(procs, hosts, B, tmp_path, "job2", 2, f"--profile-dir={empty}",
                           env={"IPP_CONNECTION_INFO": c.engine_file.read_text()},
                           export=("IPP_CONNECTION_INFO",))

    def logs():
        return (f"{c.tail()}\n--- job1:\n{log_tail(log1)}\n--- job2:\n{log_tail(log2)}\n"
                f"--- processes:\n{procs.describe()}")

    rc = RemotePython(procs, A, tmp_path)
    try:
        rc(CLIENT_PRELUDE + f"rc = ipp.Client({str(c.client_file)!r}, timeout=20)")
        ids = rc(f"out = wait_ids(4, {START_TIMEOUT})", timeout=START_TIMEOUT + 10)
        assert ids == [0, 1, 2, 3]
        where = rc("out = rc[:].apply_async(socket.gethostname).get_dict(timeout=30)")
        where = {int(k): v for k, v in where.items()}
        assert sorted(where.values()) == ["nodeA", "nodeA", "nodeB", "nodeB"], where
        on_a = sorted(i for i, h in where.items() if h == "nodeA")
        on_b = sorted(i for i, h in where.items() if h == "nodeB")

        # One broadcast reaches both jobs.
        bcast = rc("bv = rc.broadcast_view(); "
                   "out = bv.apply_async(socket.gethostname).get_dict(timeout=30)")
        assert {int(k): v for k, v in bcast.items()} == where
        # Each job is its own MPI world of 2: the allreduce never crosses jobs.
        worlds = rc("out = rc[:].apply_async(world).get_dict(timeout=30)")
        assert {int(k): v for k, v in worlds.items()} == {i: [2, 2] for i in range(4)}
        # The hub knows the two jobs apart, and each engine's host.
        eng = rc(f"out = hub_query({str(c.client_file)!r}, 'pxf_engines_request')")
        assert eng["status"] == "ok", eng
        rows = {int(k): v for k, v in eng["engines"].items()}
        assert {i: r["host"] for i, r in rows.items()} == where
        job_of = {i: r["job"] for i, r in rows.items()}
        assert len(set(job_of.values())) == 2, rows
        assert job_of[on_a[0]] == job_of[on_a[1]] != job_of[on_b[0]] == job_of[on_b[1]], rows
        assert sorted(rows[i]["rank"] for i in on_b) == [0, 1], rows

        # Job 2 is lost alone: its mpirun on nodeB stopped by PID.
        job2.send_signal(signal.SIGTERM)
        try:
            job2.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"job 2's mpirun did not exit within 15 s of SIGTERM\n{logs()}")
        assert rc(f"out = wait_ids({on_a}, 15)", timeout=25) == on_a
        assert rc("out = rc[:].apply_async(world).get_dict(timeout=30)") == \
            {str(i): [2, 2] for i in on_a}
        assert job1.poll() is None, logs()
        assert not netns_procs(B, str(PXENGINE)), "pxengine ranks left on nodeB"
    except AssertionError as e:
        raise AssertionError(f"{e}\n{logs()}") from None
    finally:
        rc.close_client()


# --- 2. a collaborator's client on a third host, through SSH ---------------------------------

def test_client_on_third_host_through_ssh(hosts, procs, tmp_path):
    A, C = hosts["nodeA"], hosts["nodeC"]
    c = start_controller(procs, A, tmp_path / "ctl", "--ip=127.0.0.1", "--ssh=nodeA")
    info = c.client_info()
    assert info["ssh"] == "nodeA" and info["interface"] == "tcp://127.0.0.1", info
    job, log = start_job(procs, hosts, A, tmp_path, "job", 2, f"--profile-dir={c.profile}")
    # The stock client runs `ssh` (pexpect): on nodeC, for this process only, an `ssh` first
    # on PATH that uses the test cluster's config (never the real ~/.ssh). It ignores SIGHUP:
    # zmq.ssh.tunnel spawns `ssh -f ... sleep N` on a pty whose session leader is that ssh,
    # and when it forks to the background and exits, the kernel hangs up the pty's foreground
    # group, which the child is still in until daemon() reaches setsid(). On this 2-core VM the
    # child loses that race almost every time and the tunnel dies at once (the stock client
    # then times out on its connection request); `nohup`-style SIGHUP-ignoring survives exec,
    # and ssh keeps an ignored SIGHUP ignored.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "ssh"
    wrapper.write_text(f"#!/bin/sh\ntrap '' HUP\n"
                       f"exec /usr/bin/ssh -F '{hosts.ssh_config}' \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    rports = [v for k, v in info.items() if isinstance(v, int) and k != "pid" and v > 0]
    # The collaborator connects to a running cluster: the stock client learns of engines that
    # register later only through its notification socket, which through tunnels connects
    # seconds after its connection_request (registrations in between are never seen).
    rc = RemotePython(procs, C, tmp_path, env=env)
    rc.send(CLIENT_PRELUDE + "out = socket.gethostname()")     # imports while the job starts
    wait_engines(c, 2)
    try:
        assert rc.result(timeout=30) == "nodeC"
        rc(f"info = json.load(open({str(c.client_file)!r})); "
           f"rc = ipp.Client({str(c.client_file)!r}, sshserver=info['ssh'], timeout=30)",
           timeout=60)
        assert rc("out = rc._ssh") is True
        assert rc(f"out = wait_ids(2, {START_TIMEOUT})", timeout=START_TIMEOUT + 10) == [0, 1]
        assert rc("out = rc[:].apply_sync(socket.gethostname)") == ["nodeA", "nodeA"]
        assert rc("rc[:].execute('import socket; h = socket.gethostname()', block=True); "
                  "out = rc[:].pull('h', block=True)") == ["nodeA", "nodeA"]
        assert rc("out = rc[:].apply_sync(world)") == [[2, 2], [2, 2]]
        tunnels = ssh_tunnels(C, rports)
        assert tunnels, "no `ssh -L ...` tunnel process on nodeC: how did the client connect?"
    except AssertionError as e:
        raise AssertionError(f"{e}\n{c.tail()}\n--- job:\n{log_tail(log)}") from None
    finally:
        try:
            rc.close_client()
        finally:
            # zmq.ssh.tunnel's `ssh -f ... sleep 60` daemons outlive the client: by PID.
            processes.stop_procs(ssh_tunnels(C, rports), STOP_GRACE)
    assert not ssh_tunnels(C, rports)


# --- 3. engines through --enginessh ---------------------------------------------------------

def test_engines_through_enginessh(hosts, procs, tmp_path):
    A, B = hosts["nodeA"], hosts["nodeB"]
    c = start_controller(procs, A, tmp_path / "ctl", "--ip=127.0.0.1", "--enginessh=nodeA")
    einfo = c.engine_info()
    assert einfo["ssh"] == "nodeA" and einfo["interface"] == "tcp://127.0.0.1", einfo
    fabric_port = einfo["pxf_fabric"]
    # $PXF_SSH is a command line: the test cluster's ssh config for rank 0's forward.
    job, log = start_job(procs, hosts, B, tmp_path, "job", 2, f"--file={c.engine_file}",
                         env={"PXF_SSH": f"ssh -F {hosts.ssh_config}"}, export=("PXF_SSH",))
    rc = RemotePython(procs, A, tmp_path)
    try:
        rc(CLIENT_PRELUDE + f"rc = ipp.Client({str(c.client_file)!r}, timeout=20)")
        assert rc(f"out = wait_ids(2, {START_TIMEOUT})", timeout=START_TIMEOUT + 10) == [0, 1]
        assert rc("out = rc[:].apply_sync(socket.gethostname)") == ["nodeB", "nodeB"]
        assert rc("out = rc[:].apply_sync(world)") == [[2, 2], [2, 2]]
        forwards = ssh_tunnels(B, [fabric_port])
        assert len(forwards) == 1, [p.cmdline() for p in forwards]
        assert "BatchMode=yes" in forwards[0].cmdline()
        # The job ends (the client shuts its engines down): the forward goes with it.
        rc("rc.shutdown(targets='all', block=True)")
        try:
            job.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the job did not end within 20 s of rc.shutdown()")
        wait_until(lambda: not ssh_tunnels(B, [fabric_port]), 5.0, 0.05,
                   "rank 0's ssh forward to exit with the job")
        assert not netns_procs(B, str(PXENGINE))
    except (AssertionError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{c.tail()}\n--- job:\n{log_tail(log)}") from None
    finally:
        rc.close_client()


# --- 4. bad input across hosts ----------------------------------------------------------------

def test_controller_on_loopback_ranks_elsewhere(hosts, procs, tmp_path):
    A, B = hosts["nodeA"], hosts["nodeB"]
    c = start_controller(procs, A, tmp_path / "ctl", "--ip=127.0.0.1")
    port = c.engine_info()["pxf_fabric"]
    rc_, out = run_failing_job(hosts, B, tmp_path, "job", f"--file={c.engine_file}")
    assert rc_ != 0, out
    assert f"cannot reach the controller at tcp://127.0.0.1:{port}" in out, out
    assert "refused" in out and "--ip=127.0.0.1" in out, out
    assert not netns_procs(B, str(PXENGINE))
    assert c.popen.poll() is None, c.tail()


@pytest.mark.parametrize("fault", ["unreachable", "silent"])
def test_controller_host_blocked(hosts, procs, tmp_path, fault):
    A, B = hosts["nodeA"], hosts["nodeB"]
    c = start_controller(procs, A, tmp_path / "ctl", "--ip=*")
    port = c.engine_info()["pxf_fabric"]
    if fault == "unreachable":       # a route that rejects: ICMP-style "no route"
        add = ["ip", "route", "add", "unreachable", f"{A.ip}/32"]
        undo = ["ip", "route", "del", "unreachable", f"{A.ip}/32"]
        want = f"no route to host {A.ip}"
    else:                            # packets vanish (a dropping firewall, a dead host):
        # nodeA's address pinned to a MAC nobody has, so the SYNs go nowhere
        add = ["ip", "neigh", "replace", A.ip, "lladdr", "02:00:00:00:0e:01", "dev", "eth0",
               "nud", "permanent"]
        undo = ["ip", "neigh", "del", A.ip, "dev", "eth0"]
        want = f"no answer from {A.ip}:{port}"
    r = B.run(add, timeout=10)
    assert r.returncode == 0, r.stderr
    try:
        rc_, out = run_failing_job(hosts, B, tmp_path, "job", f"--file={c.engine_file}")
    finally:
        B.run(undo, timeout=10, check=True)
    assert rc_ != 0, out
    assert f"cannot reach the controller at tcp://{A.ip}:{port}" in out, out
    assert want in out, out
    assert not netns_procs(B, str(PXENGINE))


def test_wrong_key(hosts, procs, tmp_path):
    A, B = hosts["nodeA"], hosts["nodeB"]
    c = start_controller(procs, A, tmp_path / "ctl", "--ip=*")
    info = c.engine_info()
    bad = dict(info, key="0123456789abcdef-not-the-key")
    empty = tmp_path / "profile_nodeB"
    empty.mkdir()
    rc_, out = run_failing_job(hosts, B, tmp_path, "job", f"--profile-dir={empty}",
                                     env={"IPP_CONNECTION_INFO": json.dumps(bad)},
                                     export=("IPP_CONNECTION_INFO",))
    assert rc_ != 0, out
    assert f"no registration reply from the controller at tcp://{A.ip}:{info['pxf_fabric']}" \
        in out, out
    assert "key" in out, out
    assert not netns_procs(B, str(PXENGINE))
    # The controller is still up, counted the forged registration, and serves the right key.
    assert c.popen.poll() is None, c.tail()
    q = A.python(HUB_PRELUDE + f"print(json.dumps(hub_query({str(c.client_file)!r}, "
                 "'pxf_stats_request')))", timeout=30, env=base_env(tmp_path))
    assert q.returncode == 0, q.stderr
    stats = json.loads(q.stdout)
    assert stats["counters"].get("drop.fabric.link.bad_signature", 0) >= 1, stats


def test_enginessh_sshd_down(hosts, procs, tmp_path):
    A, B = hosts["nodeA"], hosts["nodeB"]
    c = start_controller(procs, A, tmp_path / "ctl", "--ip=127.0.0.1", "--enginessh=nodeA")
    port = c.engine_info()["pxf_fabric"]
    A.stop_sshd()
    try:
        rc_, out = run_failing_job(hosts, B, tmp_path, "job", f"--file={c.engine_file}",
                                         env={"PXF_SSH": f"ssh -F {hosts.ssh_config}"},
                                         export=("PXF_SSH",))
    finally:
        A.start_sshd()
    assert rc_ != 0, out
    assert f"ssh tunnel through nodeA to 127.0.0.1:{port} failed" in out, out
    assert "Connection refused" in out, out
    assert not ssh_tunnels(B, [port]), "an ssh forward was left on nodeB"
    assert not netns_procs(B, str(PXENGINE))
