"""A real Slurm (Debian slurm-wlm 22.05 + munge) on this machine, for integration tests.

``make_slurm()`` starts a private single-node cluster: node = this machine's hostname,
NodeAddr 127.0.0.1 (loopback only). ``make_slurm(nodes=("nodeA", "nodeB"))`` starts it on
namespaced hosts (``hosts.make_hosts``): slurmctld and a slurmd on nodeA, a slurmd on nodeB
(each ``slurmd -N NODE`` inside its node's namespaces, with its own spool, pid and log
files), NodeAddr = the node addresses (10.200.0.x), SlurmctldHost=nodeA(10.200.0.1).
Everything is ours and private:

* config, state, spool, logs, pid files: one temp dir (``Slurm.workdir``,
  ``/tmp/pxfslurm<pid>-*``), removed by ``close``;
* munge: our own ``munged`` (as user ``munge``, with ``/etc/munge/munge.key``; socket,
  pid, seed and log in a temp dir of its own, ``/tmp/pxfslurm<pid>-munge-*``;
  ``AuthInfo=socket=...`` points Slurm there), so we never touch, depend on or stop a
  system munged. A unix socket is a path in the file system, so this one munged in the
  root namespace serves every node: the hosts' mount namespaces are copies of ours;
* ports: SlurmctldPort/SlurmdPort are free ports picked at start (single-node), so another
  Slurm on this machine (a system one, another harness) does not collide; the two-node
  variant uses 6817/6818 on its private addresses;
* ``TmpFS`` is per node in the workdir: PMIx makes each step's ``spmix_appdir_UID_JOB.STEP``
  there, which collides in a shared /tmp (two nodes, or two harnesses: job ids restart at 1);
* in the two-node variant each node gets this machine's cgroup mounts on /sys/fs/cgroup
  (slurmd 22.05 refuses to start without, and ``ip netns exec`` gave the node a bare sysfs);
* the daemons run in the foreground (``-D``) as our children and are stopped by PID
  (SIGTERM, then SIGKILL), after every job of this Slurm was cancelled.

Client commands need ``SLURM_CONF``: pass ``Slurm.env`` (it also carries the Open MPI
run-as-root/oversubscribe variables) to a subprocess, or use ``Slurm.run``, which runs on
``Slurm.login_node`` (nodeA) in the two-node variant: the root namespace cannot reach the
nodes. ``run`` defaults its cwd to the workdir, where ``sbatch`` writes ``slurm-<id>.out``.

The config (``_write_conf``) is made for tests:

* partitions ``debug`` (Default, MaxTime=INFINITE, OverSubscribe=FORCE:4) and ``short``
  (MaxTime=00:02:00), plus ``partitions`` given to ``make_slurm``. ``EnforcePartLimits=ALL``:
  ``sbatch -p short --time=5`` is refused at submission ("Requested time limit is invalid
  (missing or exceeds some limit)") instead of pending forever with reason
  PartitionTimeLimit; an unknown partition is refused ("invalid partition specified: X");
* every node claims ``cpus`` (default 8) CPUs whatever the machine has (``SlurmdParameters=
  config_overrides``), so ``--ntasks=8`` runs on a 2-core machine;
* ``SchedulerType=sched/builtin``: a submitted job starts within ~1 s;
* ``MinJobAge=300``: a finished job stays in slurmctld's memory for 5 minutes, so
  ``job_state`` (``scontrol show job``) reports COMPLETED, TIMEOUT, CANCELLED, FAILED, ...
  (accounting is ``none``: no ``sacct``);
* ``KillWait=5``, ``InactiveLimit=0``, ``MessageTimeout=5``. Time limits are whole minutes
  and slurmctld checks them every 30 s (``PERIODIC_TIMEOUT``, compiled in), so a
  ``--time=1`` job ends 60-95 s after it started; nothing makes that faster;
* ``AccountingStorageType=accounting_storage/none``: ``--account=ANYTHING`` is accepted
  and recorded, never checked. ``AccountingStorageEnforce=associations`` is accepted
  without slurmdbd but enforces nothing (there are no associations to check); slurmdbd is
  not installed. What *is* refused without a database: a partition with
  ``AllowAccounts=X`` refuses every job, whatever its ``--account`` ("Invalid account or
  account/partition combination specified").

API: ``make_slurm(workdir, nodes, cpus, partitions)`` -> ``Slurm`` with ``conf``, ``env``,
``workdir``, ``node_names``, ``cpus``, ``hosts``/``login_node`` (two-node), ``run(argv,
timeout)``, ``sbatch(*args)`` (job id), ``squeue(job=None)``, ``show_job(job)``,
``job_state(job)``, ``wait_job_state(job, states, timeout)``, ``wait_job_gone(job,
timeout)`` (final state), ``cancel_all()``, ``logs()``, ``close()``.

``SlurmUnavailable`` (not root, Slurm or munge not installed, munged cannot start,
namespaces unavailable for the two-node variant): tests skip with the reason. Any other
setup failure raises ``SlurmError`` with the daemons' log tails; either way nothing is left
running. ``close`` is idempotent and also runs at exit and from ``close_all()`` (which the
conftest calls on SIGTERM). After a SIGKILL of the test process the daemons stay: find them
by their ``-f /tmp/pxfslurm<pid>-*/slurm.conf`` in ``ps`` and stop them by PID.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import psutil

import hosts as _hosts
from pxfabric import processes  # (on sys.path through hosts: stopping by PID, shared)

SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"
MUNGE_KEY = "/etc/munge/munge.key"
CPUS = 8                 # per node, whatever the machine has: 8 tasks fit on 2 cores
CMD_TIMEOUT = 20.0       # one client command (sinfo, scontrol, sbatch, ...)
READY_TIMEOUT = 30.0     # daemons up and every node idle
STOP_GRACE = 5.0         # SIGTERM -> SIGKILL (slurmd waits for its steps)

OMPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}

Cmd = Union[str, Sequence[str]]

_OPEN: "list[Slurm]" = []
_OPEN_LOCK = threading.RLock()


class SlurmError(RuntimeError):
    """Starting or driving the Slurm harness failed (the message carries log tails)."""


class SlurmUnavailable(SlurmError):
    """A private Slurm cannot run on this machine (the reason says why)."""


def close_all() -> None:
    """Close every Slurm of this process not closed yet (at exit, on SIGTERM)."""
    with _OPEN_LOCK:
        todo = list(_OPEN)
    for s in todo:
        try:
            s.close()
        except Exception:  # noqa: BLE001 - best effort, the others must still be closed
            pass


atexit.register(close_all)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: missing)"
    return f"--- {path}:\n" + ("\n".join(text[-lines:]) if text else "(empty)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_available() -> None:
    """Raise SlurmUnavailable if a private Slurm cannot run here at all."""
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"the Slurm harness runs its daemons as root (euid {os.geteuid()})")
    missing = [p for p in (SLURMCTLD, SLURMD, MUNGED) if not os.access(p, os.X_OK)]
    missing += [t for t in ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
                if shutil.which(t) is None]
    if missing:
        raise SlurmUnavailable(f"missing: {', '.join(missing)} "
                               "(apt-get install slurm-wlm munge)")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        raise SlurmUnavailable("no user 'munge' (apt-get install munge)") from None
    if not os.path.exists(MUNGE_KEY):
        raise SlurmUnavailable(f"no munge key {MUNGE_KEY}")


class Slurm:
    """A private Slurm; see the module docstring. Build one with ``make_slurm``."""

    def __init__(self, workdir: Union[str, Path, None], nodes: Optional[Sequence[str]],
                 cpus: int, partitions: Optional[Mapping[str, str]]) -> None:
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"pxfslurm{os.getpid()}-"))
            self._own_workdir = True
        else:
            self.workdir = Path(workdir).resolve()
            self._own_workdir = not self.workdir.exists()
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "slurm.conf"
        self.cpus = int(cpus)
        self.extra_partitions = dict(partitions or {})
        self.hosts: Optional[_hosts.Hosts] = None
        self.login_node: Optional[_hosts.Node] = None
        self.node_names: List[str] = list(nodes) if nodes else [socket.gethostname()]
        # munged runs as user munge: its dir is a temp dir of its own, since ``workdir``
        # may sit below a directory only root can enter (pytest's tmp_path).
        self.munge_dir = Path(tempfile.mkdtemp(prefix=f"pxfslurm{os.getpid()}-munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self.ctld_port = self.slurmd_port = 0      # set by make_slurm
        self.munged: Optional[subprocess.Popen] = None
        self.slurmctld: Optional[subprocess.Popen] = None
        self.slurmds: Dict[str, subprocess.Popen] = {}
        self.ctld_log = self.workdir / "slurmctld.log"
        self.env: Dict[str, str] = {"SLURM_CONF": str(self.conf), **OMPI_ENV}
        self._closed = False
        with _OPEN_LOCK:
            _OPEN.append(self)

    def __repr__(self) -> str:
        return f"Slurm(nodes={self.node_names!r}, conf={str(self.conf)!r})"

    def __enter__(self) -> "Slurm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def slurmd_log(self, node: str) -> Path:
        return self.workdir / f"slurmd_{node}.log"

    def logs(self, lines: int = 20) -> str:
        """Tails of every daemon log (for error messages)."""
        paths = [self.munge_dir / "munged.log", self.ctld_log,
                 self.workdir / "slurmctld.out"]
        for n in self.node_names:
            paths += [self.slurmd_log(n), self.workdir / f"slurmd_{n}.out"]
        return "\n".join(_tail(p, lines) for p in paths)

    # --- setup ----------------------------------------------------------------------------
    def _start_munged(self) -> None:
        """Our own munged (user munge, foreground): private socket, never the system one."""
        munge = pwd.getpwnam("munge")
        self.munge_dir.chmod(0o755)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        out = open(self.munge_dir / "munged.out", "wb")
        try:
            self.munged = subprocess.Popen(
                [MUNGED, "--foreground",
                 f"--socket={self.munge_socket}", f"--key-file={MUNGE_KEY}",
                 f"--pid-file={self.munge_dir / 'munged.pid'}",
                 f"--seed-file={self.munge_dir / 'munged.seed'}",
                 f"--log-file={self.munge_dir / 'munged.log'}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd="/", user=munge.pw_uid, group=munge.pw_gid,
                extra_groups=[])
        finally:
            out.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.munged.poll() is not None:
                raise SlurmUnavailable(
                    f"munged exited (rc {self.munged.returncode}): "
                    f"{_tail(self.munge_dir / 'munged.out')}\n"
                    f"{_tail(self.munge_dir / 'munged.log')}")
            r = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=CMD_TIMEOUT)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged not answering after {READY_TIMEOUT} s: "
                                       f"{r.stderr.decode(errors='replace').strip()}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        w = self.workdir
        if self.hosts is not None:
            ctld_host = f"{self.node_names[0]}({self.hosts[self.node_names[0]].ip})"
            addrs = {n: self.hosts[n].ip for n in self.node_names}
        else:
            ctld_host = f"{self.node_names[0]}(127.0.0.1)"
            addrs = {self.node_names[0]: "127.0.0.1"}
        (w / "ctld").mkdir()
        for n in self.node_names:
            (w / f"spool_{n}").mkdir()
            (w / f"tmp_{n}").mkdir(mode=0o1777)
        lines = [
            "ClusterName=pxftest",
            f"SlurmctldHost={ctld_host}",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SwitchType=switch/none",
            # The main scheduler runs at each submission and each job end; no backfill.
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            # A node may claim more CPUs than the machine has (8 tasks on 2 cores).
            "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            # Partition limits (MaxTime, ...) refuse a job at submission instead of leaving
            # it pending with reason PartitionTimeLimit.
            "EnforcePartLimits=ALL",
            "MinJobAge=300",
            # Job ids unique per harness: PMIx namespaces and Open MPI's shared-memory segments
            # are named after the job id, and two harnesses at once (pytest -n 2) would both
            # start at job 1 and collide (ranks crashed in MPI_Allreduce).
            f"FirstJobId={1000 + (os.getpid() * 1000) % 60_000_000}",
            "KillWait=5",
            "InactiveLimit=0",
            "MessageTimeout=5",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "ReconfigFlags=KeepPartState",
            f"SlurmctldPidFile={w / 'slurmctld.pid'}",
            f"SlurmdPidFile={w / 'slurmd_%n.pid'}",
            f"SlurmdSpoolDir={w / 'spool_%n'}",
            f"StateSaveLocation={w / 'ctld'}",
            # Per node and per harness: PMIx puts each step's client dir there
            # (spmix_appdir_UID_JOB.STEP), which would collide in the shared /tmp between
            # nodes of one harness and between harnesses (job ids restart at 1).
            f"TmpFS={w / 'tmp_%n'}",
            f"SlurmctldLogFile={self.ctld_log}",
            f"SlurmdLogFile={w / 'slurmd_%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for n, ip in addrs.items():
            lines.append(f"NodeName={n} NodeAddr={ip} CPUs={self.cpus} Sockets=1 "
                         f"CoresPerSocket={self.cpus} ThreadsPerCore=1 State=UNKNOWN")
        lines += [
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=FORCE:4",
            "PartitionName=short Nodes=ALL MaxTime=00:02:00 State=UP OverSubscribe=FORCE:4",
        ]
        for name, opts in self.extra_partitions.items():
            lines.append(f"PartitionName={name} Nodes=ALL State=UP {opts}".rstrip())
        self.conf.write_text("\n".join(lines) + "\n")

    def _mount_cgroups(self, node: "_hosts.Node") -> None:
        """slurmd refuses to start without a cgroup filesystem on /sys/fs/cgroup (22.05 inits
        its cgroup plugin even with proctrack/linuxproc + task/none), but a node's /sys is the
        fresh sysfs ``ip netns exec`` mounted: repeat this machine's cgroup mounts there (in
        the node's private mount namespace; they go away with it)."""
        mounts = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            dev, point, fstype, opts = line.split()[:4]
            if point == "/sys/fs/cgroup" or point.startswith("/sys/fs/cgroup/"):
                mounts.append(f"mkdir -p {point} && mount -t {fstype} -o {opts} {fstype} {point}")
        if not mounts:
            raise SlurmUnavailable("no cgroup filesystem on /sys/fs/cgroup (slurmd needs one)")
        r = node.run(" && ".join(mounts), timeout=CMD_TIMEOUT)
        if r.returncode != 0:
            raise SlurmError(f"{node.name}: mounting cgroups failed: {r.stderr.strip()}")

    def _daemon_argv(self, argv: List[str], node: Optional[str]) -> List[str]:
        if self.hosts is not None and node is not None:
            return self.hosts[node].argv(argv, cwd="/")
        return argv

    def _spawn(self, argv: List[str], out_name: str, node: Optional[str]) -> subprocess.Popen:
        out = open(self.workdir / out_name, "wb")
        try:
            return subprocess.Popen(
                self._daemon_argv(argv, node), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, cwd="/",
                env={**os.environ, "SLURM_CONF": str(self.conf)})
        finally:
            out.close()

    def _start_daemons(self) -> None:
        ctld_node = self.node_names[0] if self.hosts is not None else None
        self.slurmctld = self._spawn([SLURMCTLD, "-D", "-i", "-f", str(self.conf)],
                                     "slurmctld.out", ctld_node)
        for n in self.node_names:
            self.slurmds[n] = self._spawn(
                [SLURMD, "-D", "-f", str(self.conf), "-N", n], f"slurmd_{n}.out",
                n if self.hosts is not None else None)

    def _wait_idle(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            for name, p in [("slurmctld", self.slurmctld), *self.slurmds.items()]:
                if p is not None and p.poll() is not None:
                    raise SlurmError(f"{name} exited (rc {p.returncode}) during start-up\n"
                                     f"{self.logs()}")
            try:
                r = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=CMD_TIMEOUT)
                last = (r.stdout + r.stderr).strip()
                states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
                if r.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names):
                    return
            except subprocess.TimeoutExpired:
                last = "sinfo timed out"
            if time.monotonic() > deadline:
                raise SlurmError(f"nodes not idle after {timeout} s (sinfo: {last!r})\n"
                                 f"{self.logs()}")
            time.sleep(0.1)

    # --- client commands ------------------------------------------------------------------
    def run(self, argv: Cmd, timeout: float = CMD_TIMEOUT,
            env: Optional[Mapping[str, str]] = None, cwd: Union[str, Path, None] = None,
            input: Optional[str] = None, check: bool = False) -> subprocess.CompletedProcess:
        """Run a command with ``self.env`` (plus ``env``) where Slurm is reachable: here, or on
        ``login_node`` in the two-node variant. Text output; at most ``timeout`` s (then its
        process group is stopped and ``TimeoutExpired`` raised). ``cwd`` defaults to the
        workdir (sbatch writes ``slurm-<id>.out`` into the cwd)."""
        full_env = {**self.env, **(env or {})}
        cwd = str(cwd if cwd is not None else self.workdir)
        if self.login_node is not None:
            return self.login_node.run(argv, timeout=timeout, env=full_env, cwd=cwd,
                                       input=input, check=check)
        if isinstance(argv, (str, bytes)):
            argv = ["sh", "-c", argv]
        argv = [str(a) for a in argv]
        p = subprocess.Popen(argv, env={**os.environ, **full_env}, cwd=cwd, text=True,
                             stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except BaseException as e:
            out, err = _hosts._stop_group(p)
            if isinstance(e, subprocess.TimeoutExpired):
                raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
            raise
        if check and p.returncode:
            raise subprocess.CalledProcessError(p.returncode, argv, out, err)
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    def sbatch(self, *args: str, timeout: float = CMD_TIMEOUT,
               cwd: Union[str, Path, None] = None) -> str:
        """``sbatch --parsable ARGS``; returns the job id, raises SlurmError if refused."""
        r = self.run(["sbatch", "--parsable", *args], timeout=timeout, cwd=cwd)
        if r.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} failed (rc {r.returncode}): "
                             f"{r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def squeue(self, job: Union[str, int, None] = None) -> List[Dict[str, str]]:
        """Jobs still queued or running (of ``job``, or all): dicts with id, state, name,
        reason, nodes."""
        argv = ["squeue", "-h", "-o", "%i|%T|%j|%r|%N"]
        if job is not None:
            argv += ["-j", str(job)]
        r = self.run(argv)
        if r.returncode != 0:
            if job is not None and "Invalid job id" in r.stderr:
                return []
            raise SlurmError(f"squeue failed (rc {r.returncode}): {r.stderr.strip()}")
        jobs = []
        for line in r.stdout.splitlines():
            if line.strip():
                i, state, name, reason, nodes = line.split("|", 4)
                jobs.append(dict(id=i, state=state, name=name, reason=reason, nodes=nodes))
        return jobs

    def show_job(self, job: Union[str, int]) -> Dict[str, str]:
        """``scontrol show job -o ID`` as a dict ({} once the job is forgotten, MinJobAge
        after its end)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job)])
        if r.returncode != 0:
            if "Invalid job id" in r.stderr:
                return {}
            raise SlurmError(f"scontrol show job {job} failed: {r.stderr.strip()}")
        fields = {}
        for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", r.stdout.strip()):
            fields.setdefault(m.group(1), m.group(2))
        return fields

    def job_state(self, job: Union[str, int]) -> Optional[str]:
        """PENDING, RUNNING, COMPLETED, TIMEOUT, CANCELLED, FAILED, ... (finished jobs stay
        known for MinJobAge = 300 s); None if Slurm does not know the job."""
        return self.show_job(job).get("JobState")

    def wait_job_gone(self, job: Union[str, int], timeout: float = 60.0) -> str:
        """Wait until ``job`` has left the queue (``squeue`` no longer lists it); returns its
        final state (``job_state``). Raises TimeoutError with the job's record otherwise."""
        deadline = time.monotonic() + timeout
        while self.squeue(job):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} still queued after {timeout} s: "
                                   f"{self.show_job(job)}")
            time.sleep(0.2)
        return self.job_state(job) or "UNKNOWN"

    def wait_job_state(self, job: Union[str, int], states: Sequence[str],
                       timeout: float = 60.0) -> str:
        """Wait until ``job_state(job)`` is one of ``states``; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} is {state}, not {list(states)}, after "
                                   f"{timeout} s: {self.show_job(job)}")
            time.sleep(0.2)

    def cancel_all(self, timeout: float = 30.0) -> None:
        """scancel every job of this Slurm and wait (bounded) until the queue is empty."""
        if self.slurmctld is None or self.slurmctld.poll() is not None:
            return
        ids = [j["id"] for j in self.squeue()]
        if not ids:
            return
        self.run(["scancel", *ids])
        deadline = time.monotonic() + timeout
        while self.squeue() and time.monotonic() < deadline:
            time.sleep(0.2)

    # --- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel every job, stop slurmd(s), slurmctld and our munged by PID, close the hosts,
        remove the workdir (if ours). Idempotent; safe after a half-done setup."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self.cancel_all(timeout=15.0)
            except Exception:  # noqa: BLE001 - the daemons must still be stopped
                pass
            _hosts._terminate_children(list(self.slurmds.values()), grace=STOP_GRACE)
            _hosts._terminate_children([p for p in (self.slurmctld,) if p], grace=STOP_GRACE)
            if self.munged is not None:
                _hosts._terminate_children([self.munged], grace=STOP_GRACE)
            if self.hosts is not None:     # anything left in the nodes (job steps)
                self.hosts.close()
            else:
                self._stop_leftover_steps()
        finally:
            with _OPEN_LOCK:
                if self in _OPEN:
                    _OPEN.remove(self)
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_leftover_steps(self) -> None:
        """Last resort for the single-node variant: a ``slurmstepd`` of ours that outlived our
        slurmd (steps daemonize: not our children), with its job's processes. Ours = it has a
        file of our workdir open (every step keeps its slurmd's log open; its environment is
        empty), so a step of another Slurm on this machine is never touched."""
        prefix = str(self.workdir) + os.sep
        mine = []
        for p in psutil.process_iter(["name"]):
            try:
                if p.info["name"] == "slurmstepd" and \
                        any(f.path.startswith(prefix) for f in p.open_files()):
                    mine += [p, *p.children(recursive=True)]
            except psutil.Error:
                pass
        if mine:
            processes.terminate(mine, _hosts.STOP_GRACE)


def make_slurm(workdir: Union[str, Path, None] = None, nodes: Optional[Sequence[str]] = None,
               cpus: int = CPUS, partitions: Optional[Mapping[str, str]] = None) -> Slurm:
    """Start a private Slurm and wait until every node is idle.

    ``nodes=None``: one node, this machine (hostname, 127.0.0.1). ``nodes=("nodeA",
    "nodeB")``: namespaced hosts (``hosts.make_hosts``), slurmctld on the first one, client
    commands through ``Slurm.run`` (on ``login_node``). ``cpus``: CPUs each node claims.
    ``partitions``: extra partitions, name -> options (``{"tiny": "MaxNodes=1"}``), next to
    ``debug`` and ``short``. Raises SlurmUnavailable (tests skip) or SlurmError; either way
    nothing is left behind."""
    check_available()
    s = Slurm(workdir, nodes, cpus, partitions)
    try:
        if nodes:
            try:
                s.hosts = _hosts.make_hosts(tuple(nodes), workdir=s.workdir / "hosts")
            except _hosts.HostsUnavailable as e:
                raise SlurmUnavailable(f"namespaced hosts unavailable: {e}") from e
            s.login_node = s.hosts[s.node_names[0]]
            for name in s.node_names:
                s._mount_cgroups(s.hosts[name])
            s.ctld_port, s.slurmd_port = 6817, 6818   # private addresses: no collision
        else:
            s.ctld_port, s.slurmd_port = _free_port(), _free_port()
        s._start_munged()
        s._write_conf()
        s._start_daemons()
        s._wait_idle()
    except BaseException:
        s.close()
        raise
    return s
