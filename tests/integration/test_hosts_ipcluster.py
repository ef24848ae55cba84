"""ipcluster's launchers with pxfabric across hosts (issue 12; hostfiles/IPCLUSTER.md).

Two namespaced hosts (``hosts.py``): ``ipcluster start`` runs ON nodeA with ``IPYTHONDIR`` set
and ``PYTHONPATH=<repo>/python`` (so the launcher name ``pxfabric`` resolves through
``python/pxfabric.egg-info``); the client runs on nodeA too.

* the seed profile of ipyparallel's "minimal configuration over SSH" note, as written, with
  ``controller_launcher_class = 'pxfabric'``: six stock ipengines (nodeB: 2, nodeA: 4) started
  by the stock SSH launcher register with pxcontroller, ``%px`` runs on all six, ``ipcluster
  stop`` leaves nothing on either node. Only site knobs are added (the ssh config, the remote
  interpreter, short delays) -- and ``-n 6``: 7.1 starts at most ``n`` engines (default: the
  number of CPUs here) from the ``engines`` dict. ``--daemonize``: a foreground ``ipcluster
  start`` stops the cluster too when ``ipcluster stop`` stops its controller, and then both
  fetch and delete the same remote engine logs over ssh (the loser retries 10 s per engine);
* the stock ipcontroller 7.1 on that profile: "Address already in use" (xfail, strict);
* ``engine_launcher_class = 'pxfabric'`` with the hostfile in ``PxMPIEngineSetLauncher.mpi_args``
  (foreground ``ipcluster start``): one MPI job of 4 pxengine ranks over nodeA:2 + nodeB:2, the
  remote ranks with PYTHONPATH, PYTHONUNBUFFERED and IPP_CONNECTION_INFO exported;
* the launcher's command line, config spellings (``hostfile``, ``MPILauncher.mpi_args``,
  ``LocalControllerLauncher.controller_args``) and environment (no processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

HOSTS = ("nodeA", "nodeB")

REPO = Path(__file__).resolve().parents[2]
PYTHON_DIR = REPO / "python"
PYTHON = "/usr/bin/python3"
PXCONTROLLER = Path(os.environ.get("PXF_PXCONTROLLER") or REPO / "build" / "bin" / "pxcontroller")
PXENGINE = Path(os.environ.get("PXF_PXENGINE") or REPO / "build" / "bin" / "pxengine")

sys.path.insert(0, str(PYTHON_DIR))
from pxfabric import processes  # noqa: E402  (stopping by PID, shared with pxcluster and bench/)

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}

START_TIMEOUT = 60.0      # engines registered after `ipcluster start`
STOP_TIMEOUT = 60.0       # `ipcluster stop` (the SSH launcher stops engines one ssh at a time)
GONE_TIMEOUT = 15.0       # every process gone from both nodes after `ipcluster stop`

needs_binaries = pytest.mark.skipif(
    not (os.access(PXCONTROLLER, os.X_OK) and os.access(PXENGINE, os.X_OK)),
    reason=f"{PXCONTROLLER} / {PXENGINE} not built (bash scripts/build.sh)")


# ------------------------------------------------------------------------------ helpers

def _strays(hosts) -> "list[psutil.Process]":
    """Processes inside the nodes' network namespaces other than the harness's own (the
    namespace holders and sshds): what a cluster left behind."""
    keep = set()
    for node in hosts.nodes.values():
        keep.update(p for p in (node.pid, node.sshd_pid) if p)
    procs = []
    for node in hosts.nodes.values():
        r = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True,
                           timeout=10)
        for tok in r.stdout.split():
            if tok.isdigit() and int(tok) not in keep:
                try:
                    procs.append(psutil.Process(int(tok)))
                except psutil.Error:
                    pass
    return procs


def _describe(procs) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            out.append(f"{p.pid}: (gone)")
    return "\n".join(out)


def _kill(procs) -> None:
    """Fallback: stop by PID (SIGTERM, 3 s, SIGKILL)."""
    processes.stop_procs(procs, grace=3.0)


class IpCluster:
    """``ipcluster start --profile=NAME`` on nodeA of ``hosts`` (a profile under
    ``<workdir>/ipython``), its client code run on nodeA, ``ipcluster stop`` and the check
    that nothing is left on any node (stopped by PID as a fallback)."""

    def __init__(self, hosts, name: str, ipcluster_config: str, ipcontroller_config: str = ""):
        self.hosts = hosts
        self.node = hosts["nodeA"]
        self.name = name
        self.ipython_dir = hosts.workdir / "ipython"
        self.profile_dir = self.ipython_dir / f"profile_{name}"
        (self.profile_dir / "security").mkdir(parents=True, exist_ok=True)
        for fname, text in (("ipcluster_config.py", ipcluster_config),
                            ("ipcontroller_config.py", ipcontroller_config)):
            text = textwrap.dedent(text)
            compile(text, fname, "exec")      # ipcluster would only log a broken config
            (self.profile_dir / fname).write_text(text)
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env = dict(MPI_ENV, IPYTHONDIR=str(self.ipython_dir),
                        PYTHONPATH=os.pathsep.join([str(PYTHON_DIR)] + paths),
                        PXF_CONTROLLER=str(PXCONTROLLER), PXF_ENGINE=str(PXENGINE))
        self.log = hosts.workdir / f"ipcluster-{name}.log"
        self.proc = None
        self.started = self.stopped = False

    def start(self, *args: str) -> None:
        """``ipcluster start --profile=NAME ARGS`` in the background (as in a terminal); with
        ``--daemonize`` it returns once the engines are launched (bounded here)."""
        self.started = True
        with open(self.log, "wb") as f:
            self.proc = self.node.popen(["ipcluster", "start", f"--profile={self.name}", *args],
                                        env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                        cwd=str(self.hosts.workdir))
        if "--daemonize" in args:
            try:
                rc = self.proc.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`ipcluster start --daemonize` still running after "
                            f"{START_TIMEOUT:g} s:\n{self.log_tail()}")
            assert rc == 0, f"ipcluster start: rc {rc}\n{self.log_tail()}"

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no ipcluster log)"
        return "\n".join(lines[-n:])

    def client(self, code: str, timeout: float) -> dict:
        """Run ``code`` (which prints one ``RESULT <json>`` line) on nodeA; return the JSON."""
        r = self.node.python(code, timeout=timeout, env=self.env,
                             cwd=str(self.hosts.workdir))
        rows = [line[7:] for line in r.stdout.splitlines() if line.startswith("RESULT ")]
        assert r.returncode == 0 and rows, (
            f"client on nodeA failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n"
            f"{r.stderr[-3000:]}\n--- ipcluster log:\n{self.log_tail()}")
        return json.loads(rows[-1])

    def stop(self) -> None:
        """``ipcluster stop``, then: ``ipcluster start`` exits and nothing is left on any node."""
        self.stopped = True
        r = self.node.run(["ipcluster", "stop", f"--profile={self.name}"], env=self.env,
                          timeout=STOP_TIMEOUT, cwd=str(self.hosts.workdir))
        assert r.returncode == 0, f"ipcluster stop: rc {r.returncode}\n{r.stderr[-3000:]}"
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`ipcluster start` still running {STOP_TIMEOUT:g} s after "
                        f"`ipcluster stop`:\n{self.log_tail()}")
        deadline = time.monotonic() + GONE_TIMEOUT
        while (left := _strays(self.hosts)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            desc = _describe(left)
            _kill(left)
            pytest.fail(f"left behind on the nodes by `ipcluster stop`:\n{desc}")
        security = self.profile_dir / "security"
        conn = sorted(p.name for p in security.glob("ipcontroller-*.json"))
        assert not conn, f"connection files left: {conn}"
        assert not list(security.glob("cluster-*.json")), "cluster file left"

    def close(self) -> None:
        """Whatever happened: stop everything (ipcluster stop, then by PID on both nodes)."""
        if self.started and not self.stopped:
            try:
                self.node.run(["ipcluster", "stop", f"--profile={self.name}"], env=self.env,
                              timeout=STOP_TIMEOUT, cwd=str(self.hosts.workdir))
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        left = _strays(self.hosts)
        if left:
            _kill(left)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _shell_prelude(profile: str, n: int, wait: float) -> str:
    """Client code: connect, wait for ``n`` engines, a real ``%px`` through IPython."""
    return textwrap.dedent(f"""
        import json, os, socket, sys
        import ipyparallel as ipp
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config
        rc = ipp.Client(profile={profile!r})
        rc.wait_for_engines({n}, timeout={wait})
        cfg = Config(); cfg.HistoryManager.enabled = False
        ip = InteractiveShell.instance(config=cfg)
        dv = rc[:]
        dv.block = True
        dv.activate()
        """)


# ------------------------------------------------------------------------ the seed profile

SEED_CLUSTER = """\
    # ipyparallel's "minimal configuration over SSH", with pxfabric's controller, as written:
    c.IPClusterEngines.engine_launcher_class = 'SSH'
    c.IPClusterStart.controller_launcher_class = 'pxfabric'
    c.LocalControllerLauncher.controller_args = ["--ip=*"]
    c.IPClusterStart.controller_location = '{ip}'
    c.SSHEngineSetLauncher.engines = {{'nodeB': 1, 'nodeA': 2}}
    # this site: ssh with the test's config; the interpreter that has ipyparallel; no waits
    c.SSHLauncher.ssh_args = ['-F', '{ssh_config}']
    c.SSHLauncher.scp_args = ['-F', '{ssh_config}']
    c.SSHLauncher.remote_python = '/usr/bin/python3'
    c.SSHEngineSetLauncher.engine_cmd = ['/usr/bin/python3', '-m', 'ipyparallel.engine']
    c.Cluster.delay = 0.1
    c.SSHEngineSetLauncher.delay = 0.0
    """

SEED_CONTROLLER = """\
    c.HubFactory.client_ip = '{ip}'
    c.HeartMonitor.period = 500
    """


@needs_binaries
@pytest.mark.timeout(200)
def test_seed_ssh_profile_stock_engines_on_two_nodes(hosts):
    ip = hosts["nodeA"].ip
    ipc = IpCluster(hosts, "snet", SEED_CLUSTER.format(ip=ip, ssh_config=hosts.ssh_config),
                    SEED_CONTROLLER.format(ip=ip))
    try:
        ipc.start("-n", "3", "--daemonize")
        got = ipc.client(_shell_prelude("snet", 3, START_TIMEOUT) + textwrap.dedent("""
            ip.run_line_magic("px", "import os, socket; px_host = socket.gethostname(); "
                                    "px_pid = os.getpid()")
            hosts = dv.pull("px_host")
            pids = dv.pull("px_pid")
            sq = dv.apply_sync(lambda x: x * x, 7)
            lb = rc.load_balanced_view().map_sync(lambda x: x + 1, range(12))
            print("RESULT " + json.dumps(dict(ids=rc.ids, hosts=hosts, pids=pids, sq=sq, lb=lb)))
            """), timeout=START_TIMEOUT + 30)
        assert len(got["ids"]) == 3, got
        assert sorted(got["hosts"]) == ["nodeA"] * 2 + ["nodeB"], got
        assert len(set(zip(got["hosts"], got["pids"]))) == 3      # three engine processes
        assert got["sq"] == [49] * 3
        assert got["lb"] == list(range(1, 13))
        # pxcontroller took the profile's HubFactory.client_ip and ipcluster's location
        security = ipc.profile_dir / "security"
        client_file = json.loads((security / "ipcontroller-client.json").read_text())
        engine_file = json.loads((security / "ipcontroller-engine.json").read_text())
        assert client_file["interface"] == f"tcp://{ip}", client_file
        assert engine_file["interface"] == "tcp://*", engine_file
        assert engine_file["location"] == ip, engine_file
        cluster_file = json.loads((security / "cluster-.json").read_text())
        assert cluster_file["controller"]["class"] == "pxfabric"
        assert cluster_file["engines"]["class"] == "ssh"
        ipc.stop()
    finally:
        ipc.close()


@pytest.mark.timeout(60)
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="stock ipcontroller 7.1 binds the registration port on both "
                          "HubFactory.client_ip and --ip=*: 'Address already in use'")
def test_seed_ssh_profile_stock_ipcontroller(hosts):
    ip = hosts["nodeA"].ip
    ipc = IpCluster(hosts, "snetstock", "", SEED_CONTROLLER.format(ip=ip))
    node = hosts["nodeA"]
    log = hosts.workdir / "ipcontroller-stock.log"
    with open(log, "wb") as f:
        p = node.popen(["ipcontroller", "--profile=snetstock", "--ip=*", f"--location={ip}"],
                       env=ipc.env, stdout=f, stderr=subprocess.STDOUT)
    engine_file = ipc.profile_dir / "security" / "ipcontroller-engine.json"
    try:
        deadline = time.monotonic() + 30
        while p.poll() is None and not engine_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = log.read_text(errors="replace")
        if p.poll() is not None and "Address already in use" not in text:
            pytest.fail(f"stock ipcontroller exited (rc {p.returncode}), not for the known "
                        f"reason:\n{text[-1500:]}", pytrace=False)
        assert p.poll() is None and engine_file.exists(), \
            f"stock ipcontroller exited (rc {p.returncode}):\n{text[-600:]}"
    finally:
        if p.poll() is None:  # not reaped: its PID is still ours
            processes.terminate([psutil.Process(p.pid)], 10.0)  # SIGTERM, 10 s, SIGKILL
            p.wait(timeout=5)
        _kill(_strays(hosts))


# -------------------------------------------------------------- pxfabric MPI engines, hostfile

MPI_CLUSTER = """\
    c.IPClusterEngines.engine_launcher_class = 'pxfabric'
    c.IPClusterStart.controller_launcher_class = 'pxfabric.launchers.PxControllerLauncher'
    c.PxControllerLauncher.controller_args = ['--ip=*']
    c.Cluster.delay = 0.1
    """

MPI_CONTROLLER = """\
    c.HeartMonitor.period = 500
    """


@needs_binaries
@pytest.mark.timeout(120)
def test_pxfabric_engines_one_mpi_job_across_hosts(hosts):
    """4 pxengine ranks over nodeA:2 + nodeB:2 as one MPI job started by ipcluster, with the
    profile of hostfiles/IPCLUSTER.md (the hostfile in PxMPIEngineSetLauncher.mpi_args)."""
    hf = hosts.write_hostfile(hosts.workdir / "two-nodes", {"nodeA": 2, "nodeB": 2})
    mpi_args = ["--hostfile", str(hf), *hosts.mpirun_args()]
    name = "pxmpi"
    ipc = IpCluster(hosts, name, textwrap.dedent(MPI_CLUSTER)
                    + f"c.PxMPIEngineSetLauncher.mpi_args = {mpi_args!r}\n", MPI_CONTROLLER)
    want = ["nodeA", "nodeA", "nodeB", "nodeB"]
    try:
        ipc.start("-n", "4")
        engine_file = ipc.profile_dir / "security" / "ipcontroller-engine.json"
        got = ipc.client(_shell_prelude(name, 4, START_TIMEOUT) + textwrap.dedent(f"""
            ip.run_line_magic("px", "from mpi4py import MPI; import os, socket; "
                                    "rank = MPI.COMM_WORLD.rank; host = socket.gethostname(); "
                                    "total = MPI.COMM_WORLD.allreduce(1); "
                                    "env = {{k: os.environ.get(k) for k in ('PYTHONPATH', "
                                    "'PYTHONUNBUFFERED', 'IPP_CONNECTION_INFO')}}")
            rows = dict(ids=rc.ids, rank=dv.pull("rank"), host=dv.pull("host"),
                        total=dv.pull("total"), env=dv.pull("env"),
                        engine_file=open({str(engine_file)!r}).read())
            print("RESULT " + json.dumps(rows))
            """), timeout=START_TIMEOUT + 30)
        assert sorted(got["rank"]) == [0, 1, 2, 3], got
        by_rank = {r: h for r, h in zip(got["rank"], got["host"])}
        assert [by_rank[r] for r in range(4)] == want, got
        assert got["total"] == [4, 4, 4, 4]
        for env in got["env"]:          # exported to every rank, the remote ones included
            assert str(PYTHON_DIR) in env["PYTHONPATH"].split(os.pathsep)
            assert env["PYTHONUNBUFFERED"] == "1"
            assert json.loads(env["IPP_CONNECTION_INFO"]) == json.loads(got["engine_file"])
        cluster_file = json.loads((ipc.profile_dir / "security" / "cluster-.json").read_text())
        assert cluster_file["controller"]["class"] == "pxfabric"
        assert cluster_file["engines"]["class"] == "pxfabric"
        assert len(cluster_file["engines"]["sets"]) == 1          # one MPI job
        ipc.stop()
    finally:
        ipc.close()


# --------------------------------------------------------------- the launcher, no processes

def test_mpi_launcher_command_line_across_hosts(tmp_path, monkeypatch):
    from pxfabric.launchers import PxMPIEngineSetLauncher

    local = PxMPIEngineSetLauncher(profile_dir=str(tmp_path), cluster_id="c",
                                   engine_cmd=[str(PXENGINE)])
    local.n = 4
    assert local.args[:4] == ["mpiexec", "-n", "4", str(PXENGINE)]   # unchanged on one host
    assert "-x" not in local.args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf").write_text("nodeA slots=2\n")
    eng = PxMPIEngineSetLauncher(profile_dir=str(tmp_path), cluster_id="c", hostfile="hf",
                                 mpi_args=["--mca", "plm_rsh_agent", "ssh"],
                                 engine_cmd=[str(PXENGINE)])
    eng.n = 4
    assert eng.args[:13] == ["mpiexec", "-n", "4", "--hostfile", str(tmp_path / "hf"),
                             "-x", "PYTHONPATH", "-x", "PYTHONUNBUFFERED",
                             "-x", "IPP_CONNECTION_INFO", "--mca", "plm_rsh_agent"]
    for flag in ("--hostfile", "-hostfile", "--host", "-H", "--host=a,b"):
        e = PxMPIEngineSetLauncher(profile_dir=str(tmp_path), mpi_args=[flag, "a"],
                                   engine_cmd=[str(PXENGINE)])
        e.n = 2
        assert e.across_hosts and e.args.count("-x") == 3, (flag, e.args)
    # the spellings of a profile: the hostfile trait with the stock MPILauncher.mpi_args ...
    from traitlets.config import Config
    cfg = Config()
    cfg.PxMPIEngineSetLauncher.hostfile = "hf"
    cfg.MPILauncher.mpi_args = ["--mca", "plm_rsh_agent", "ssh -F cfg"]
    e = PxMPIEngineSetLauncher(config=cfg, profile_dir=str(tmp_path), engine_cmd=[str(PXENGINE)])
    e.n = 4
    assert e.args[3:14] == ["--hostfile", str(tmp_path / "hf"), "-x", "PYTHONPATH",
                            "-x", "PYTHONUNBUFFERED", "-x", "IPP_CONNECTION_INFO",
                            "--mca", "plm_rsh_agent", "ssh -F cfg"]
    # ... the launcher's own mpi_args beat the stock class's; controller_args both ways
    cfg.PxMPIEngineSetLauncher.mpi_args = ["-H", "nodeA,nodeB"]
    cfg.PxMPIEngineSetLauncher.hostfile = ""
    e = PxMPIEngineSetLauncher(config=cfg, profile_dir=str(tmp_path), engine_cmd=[str(PXENGINE)])
    e.n = 2
    assert e.mpi_args == ["-H", "nodeA,nodeB"] and e.across_hosts
    from pxfabric.launchers import PxControllerLauncher
    for cls in ("LocalControllerLauncher", "PxControllerLauncher"):
        cfg = Config()
        cfg[cls].controller_args = ["--ip=*"]
        assert PxControllerLauncher(config=cfg).controller_args == ["--ip=*"]
    # a variable already exported in mpi_args is not exported twice
    e = PxMPIEngineSetLauncher(profile_dir=str(tmp_path), engine_cmd=[str(PXENGINE)],
                               mpi_args=["-H", "a,b", "-x", "PYTHONPATH=/x"])
    e.n = 2
    assert e.args.count("PYTHONPATH") + e.args.count("PYTHONPATH=/x") == 1
    e.export_env = False
    assert e.args.count("-x") == 1


def test_mpi_launcher_environment_across_hosts(tmp_path):
    from ipyparallel.cluster.launcher import LauncherError
    from pxfabric.launchers import PxMPIEngineSetLauncher

    eng = PxMPIEngineSetLauncher(profile_dir=str(tmp_path), cluster_id="c",
                                 mpi_args=["--host", "nodeA,nodeB"], connection_info_timeout=0.3)
    with pytest.raises(LauncherError, match="not written within"):
        eng.job_env()
    info = {"interface": "tcp://*", "location": "nodeA", "key": "k", "registration": 1}
    path = Path(eng.connection_files["engine"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))
    env = eng.job_env()
    assert json.loads(env["IPP_CONNECTION_INFO"]) == info
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(PYTHON_DIR)
    # a missing hostfile is an error before anything starts
    bad = PxMPIEngineSetLauncher(profile_dir=str(tmp_path), hostfile=str(tmp_path / "nope"),
                                 engine_cmd=[str(PXENGINE)] if PXENGINE.exists() else ["true"])
    with pytest.raises(LauncherError, match="hostfile .* does not exist"):
        bad.start(2)
    assert bad.state == "before"
    (tmp_path / "hf").write_text("nodeA slots=2\n")
    two = PxMPIEngineSetLauncher(profile_dir=str(tmp_path), hostfile=str(tmp_path / "hf"),
                                 mpi_args=["--hostfile", str(tmp_path / "hf")],
                                 engine_cmd=bad.engine_cmd)
    with pytest.raises(LauncherError, match="two hostfiles"):
        two.start(2)
    assert two.state == "before"
