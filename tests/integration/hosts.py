"""Real "hosts" on one machine: network namespaces with their own hostname, /etc/hosts and sshd.

``make_hosts(("nodeA", "nodeB"))`` builds a small private cluster on this machine:

* a "lan" network namespace holding a bridge ``br0`` (no address, no route anywhere);
* per node a network namespace joined to that bridge by a veth pair whose two ends are created
  directly inside the namespaces (``ip link add eth0 netns NODE type veth peer name vI netns
  LAN``), so no interface of ours ever exists in the root namespace. The node's ``eth0`` gets
  10.200.0.1, .2, ... /24 (in node order) and ``lo`` is up; IPv6 is off in the nodes. No
  default route: traffic can only go to loopback or to these namespace addresses, never out of
  the machine (and the root namespace cannot reach the nodes: run clients on a node);
* per node one long-lived *holder* process (``sleep infinity``) started as ``ip netns exec NS
  unshare --uts --mount --propagation private sh -c 'hostname NODE; mount --bind HOSTS
  /etc/hosts; exec sleep infinity'``: the node's own hostname (UTS namespace) and its own
  ``/etc/hosts`` (a bind mount in a private mount namespace; every node name -> its address,
  plus the localhost lines), so ``nodeB`` resolves to 10.200.0.2 on every node. The mount
  namespace is a copy of the root one: /tmp, /work etc. are the same files. All nodes bind the
  same hosts file, so ``add_node`` updates every node's /etc/hosts in place;
* per node an ``sshd -D`` listening on NODE_IP:22 inside the holder's namespaces (so every ssh
  session sees the node's hostname and /etc/hosts); host key and one user key (ed25519) live in
  the workdir, root may log in with the key only, ``SetEnv OMPI_ALLOW_RUN_AS_ROOT=1
  OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1``. ``Hosts.ssh_config`` is a client config for that key and
  ``Hosts.rsh_agent`` (``ssh -F CONFIG``) is what ``mpirun --mca plm_rsh_agent`` needs.

Anything runs on a node with ``nsenter -t HOLDER_PID -n -u -m --wd=CWD -- argv``
(``Node.argv``/``run``/``popen``/``python``). The holder (not sshd) pins the namespaces, so
``Node.stop_sshd()`` leaves the node usable ("host up, sshd down") and ``Node.unplug()`` takes
its LAN cable out ("host unreachable").

Rules:
* addresses exist only inside the namespaces; nothing is configured in the root namespace
  except the names under /run/netns (made unique per process: ``pxfh<pid>-<seq>-<node>``);
* ``Hosts.close()`` (idempotent; also run at exit and by ``close_all()``, which the pytest
  conftest calls on SIGTERM) stops what it started by PID: each sshd and holder, every process
  it started with ``popen``, then every PID ``ip netns pids`` lists for *its own* namespaces
  (SIGTERM, then SIGKILL after a grace period), then ``ip netns del`` for each namespace it
  created, then removes the workdir if it made it. It is safe after a failed, half-done setup;
* every external command has a timeout;
* if namespaces cannot be made here (not root, a tool missing, ``ip netns add``/bridge/veth
  refused, ``unshare`` refused), ``make_hosts`` raises ``HostsUnavailable(reason)`` (tests skip
  with that reason); any other setup failure raises ``HostsError`` with log tails.

Open MPI 4.1 across the nodes (from a node: ``mpirun --hostfile HF -n 4 *hosts.mpirun_args()
...``): see ``Hosts.mpirun_args`` for what is needed and why.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
from pxfabric import processes  # noqa: E402  (stopping by PID, shared with pxcluster and bench/)

PYTHON = "/usr/bin/python3"
SUBNET = "10.200.0"  # node i (0-based) is SUBNET.(i+1)/24
PREFIX_LEN = 24
SSH_PORT = 22
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"

CMD_TIMEOUT = 10.0       # any one setup/teardown command
READY_TIMEOUT = 10.0     # a holder to set up its namespaces, an sshd to accept
STOP_GRACE = 3.0         # SIGTERM -> SIGKILL

Cmd = Union[str, Sequence[str]]

_SEQ = itertools.count()
_OPEN: "list[Hosts]" = []          # not yet closed (including half-built ones)
_OPEN_LOCK = threading.RLock()
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,30}$")


class HostsError(RuntimeError):
    """Setting up the hosts failed (the message carries the relevant log tails)."""


class HostsUnavailable(HostsError):
    """Network namespaces cannot be made on this machine (the reason says why)."""


def close_all() -> None:
    """Close every Hosts of this process not closed yet (at exit, on SIGTERM)."""
    with _OPEN_LOCK:
        todo = list(_OPEN)
    for h in todo:
        try:
            h.close()
        except Exception:  # noqa: BLE001 - best effort, the others must still be closed
            pass


atexit.register(close_all)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: missing)"
    return "\n".join(text[-lines:]) if text else f"({path}: empty)"


def _run(argv: Sequence[str], timeout: float = CMD_TIMEOUT, check: bool = True,
         unavailable: bool = False) -> subprocess.CompletedProcess:
    """Run a setup/teardown command; failures raise HostsUnavailable or HostsError."""
    try:
        p = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        if not check:
            return subprocess.CompletedProcess(argv, -1, "", str(e))
        raise (HostsUnavailable if unavailable else HostsError)(f"{' '.join(argv)}: {e}") from e
    if check and p.returncode != 0:
        msg = f"`{' '.join(argv)}` failed (rc {p.returncode}): {p.stderr.strip() or p.stdout.strip()}"
        raise (HostsUnavailable if unavailable else HostsError)(msg)
    return p


def _terminate_children(popens: Iterable[subprocess.Popen], grace: float = STOP_GRACE) -> None:
    """Stop our own children: SIGTERM, wait up to ``grace``, SIGKILL, reap. A child not reaped
    yet still owns its PID, so signalling it through Popen never hits a reused PID."""
    popens = [p for p in popens if p.poll() is None]
    for p in popens:
        try:
            p.terminate()
        except OSError:
            pass
    deadline = time.monotonic() + grace
    for p in popens:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                p.kill()
            except OSError:
                pass
    for p in popens:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def _stop_group(p: subprocess.Popen):
    """Stop the process group led by our child ``p`` (SIGTERM, then SIGKILL: mpirun gets the
    chance to take its remote daemons down); return what it still wrote, all bounded."""
    out = err = None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except OSError:
            pass
        try:
            out, err = p.communicate(timeout=STOP_GRACE)
            break
        except subprocess.TimeoutExpired as e:
            out, err = e.output, e.stderr             # what was read so far
            if p.poll() is not None:                  # gone; a stray outside the group holds
                break                                 # the pipes: give up on them
        except (OSError, ValueError):
            break
    if isinstance(out, bytes) and p.text_mode:
        out = out.decode(errors="replace")
    if isinstance(err, bytes) and p.text_mode:
        err = err.decode(errors="replace")
    for f in (p.stdin, p.stdout, p.stderr):     # a stray holding the pipes must not hang us
        if f is not None and not f.closed:
            f.close()
    try:
        p.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        pass
    return out, err


class Node:
    """One "host": its namespaces are pinned by the holder process ``pid``."""

    def __init__(self, hosts: "Hosts", name: str, index: int) -> None:
        self.hosts = hosts
        self.name = name
        self.index = index
        self.ip = f"{SUBNET}.{index + 1}"
        self.netns = f"{hosts.prefix}-{name}"
        self.lan_port = f"v{index}"       # the veth end on the bridge, inside the lan namespace
        self.holder: Optional[subprocess.Popen] = None
        self.sshd: Optional[subprocess.Popen] = None
        self.sshd_config = hosts.workdir / f"sshd_{name}.conf"
        self.sshd_log = hosts.workdir / f"sshd_{name}.log"
        self.holder_log = hosts.workdir / f"holder_{name}.log"

    def __repr__(self) -> str:
        return f"Node({self.name!r}, ip={self.ip!r}, pid={self.pid})"

    @property
    def pid(self) -> Optional[int]:
        """PID of the holder process whose namespaces (net, uts, mnt) are this node's."""
        return self.holder.pid if self.holder else None

    @property
    def sshd_pid(self) -> Optional[int]:
        return self.sshd.pid if self.sshd and self.sshd.poll() is None else None

    # --- running things on the node -------------------------------------------------------
    def argv(self, cmd: Cmd, cwd: Union[str, Path, None] = None) -> List[str]:
        """``nsenter`` prefix + cmd (a string runs under ``sh -c``). Entering a mount namespace
        resets the working directory to /, so ``--wd`` carries ``cwd`` (default: ours) over."""
        if self.pid is None:
            raise HostsError(f"node {self.name} is not running")
        if isinstance(cmd, (str, bytes)):
            cmd = ["sh", "-c", cmd]
        if cwd is None:
            try:
                cwd = os.getcwd()
            except OSError:
                cwd = "/"
        return ["nsenter", "-t", str(self.pid), "-n", "-u", "-m", f"--wd={cwd}", "--",
                *[str(c) for c in cmd]]

    @staticmethod
    def _env(env: Optional[Mapping[str, str]]) -> Optional[Dict[str, str]]:
        return None if env is None else {**os.environ, **{k: str(v) for k, v in env.items()}}

    def run(self, cmd: Cmd, timeout: float = 60.0, env: Optional[Mapping[str, str]] = None,
            input: Optional[str] = None, check: bool = False,
            **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` on the node and wait (at most ``timeout`` s): CompletedProcess with text
        stdout/stderr (``subprocess.run``-like; ``env`` *adds* variables to ours). On timeout
        (or any exception while waiting, e.g. a pytest-timeout) the command's process group is
        stopped (SIGTERM, then SIGKILL) and the exception raised (``TimeoutExpired``)."""
        kw.setdefault("stdin", subprocess.PIPE if input is not None else subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        kw["start_new_session"] = True           # the child leads its own process group
        argv = self.argv(cmd, kw.get("cwd"))
        p = subprocess.Popen(argv, env=self._env(env), **kw)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except BaseException as e:
            out, err = _stop_group(p)
            if isinstance(e, subprocess.TimeoutExpired):
                raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
            raise
        if check and p.returncode:
            raise subprocess.CalledProcessError(p.returncode, argv, out, err)
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    def popen(self, cmd: Cmd, env: Optional[Mapping[str, str]] = None,
              **kw) -> subprocess.Popen:
        """Start ``cmd`` on the node (own session); ``Hosts.close`` stops it if still running."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.argv(cmd, kw.get("cwd")), env=self._env(env), **kw)
        self.hosts._started.append(p)
        return p

    def python(self, code: str, timeout: float = 60.0,
               env: Optional[Mapping[str, str]] = None, **kw) -> subprocess.CompletedProcess:
        """``/usr/bin/python3 -c code`` on the node."""
        return self.run([PYTHON, "-c", code], timeout=timeout, env=env, **kw)

    def ssh(self, target: str, cmd: str, timeout: float = 30.0,
            **kw) -> subprocess.CompletedProcess:
        """``ssh -F CONFIG target cmd`` from this node."""
        return self.run(["ssh", "-F", str(self.hosts.ssh_config), target, cmd],
                        timeout=timeout, **kw)

    # --- faults ---------------------------------------------------------------------------
    def stop_sshd(self) -> None:
        """Stop this node's sshd (by PID). The node stays up; ssh to it is refused. Sessions
        already open keep running."""
        if self.sshd is not None:
            _terminate_children([self.sshd])
            self.sshd = None

    def _spawn_sshd(self) -> None:
        log = open(self.hosts.workdir / f"sshd_{self.name}.out", "ab")
        try:
            self.sshd = subprocess.Popen(
                self.argv([SSHD, "-D", "-f", str(self.sshd_config), "-E", str(self.sshd_log)],
                          cwd="/"),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        finally:
            log.close()

    def start_sshd(self, timeout: float = READY_TIMEOUT) -> None:
        """(Re)start this node's sshd and wait until it accepts connections."""
        if self.sshd is None or self.sshd.poll() is not None:
            self._spawn_sshd()
        self.wait_port(SSH_PORT, timeout, self.sshd)

    def wait_port(self, port: int, timeout: float = READY_TIMEOUT,
                  proc: Optional[subprocess.Popen] = None, ip: Optional[str] = None) -> None:
        """Wait until ``ip:port`` (default this node's address) accepts a TCP connection, as
        seen from inside this node; bounded, fails early if ``proc`` exits."""
        ip = ip or self.ip
        probe = self.argv(["bash", "-c", f"exec 3<>/dev/tcp/{ip}/{port}"], cwd="/")
        deadline = time.monotonic() + timeout
        while True:
            if proc is not None and proc.poll() is not None:
                raise HostsError(f"{self.name}: process {proc.pid} exited (rc {proc.returncode})"
                                 f" before {ip}:{port} accepted; sshd log:\n{_tail(self.sshd_log)}"
                                 f"\n{_tail(self.hosts.workdir / f'sshd_{self.name}.out')}")
            r = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=CMD_TIMEOUT)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise HostsError(f"{self.name}: {ip}:{port} not accepting after {timeout} s: "
                                 f"{r.stderr.decode(errors='replace').strip()}\n"
                                 f"sshd log:\n{_tail(self.sshd_log)}")
            time.sleep(0.02)

    def unplug(self) -> None:
        """Take the node's LAN cable out (its bridge port down): it becomes unreachable."""
        _run(["ip", "-n", self.hosts.lan, "link", "set", self.lan_port, "down"])

    def plug(self) -> None:
        """Undo ``unplug``."""
        _run(["ip", "-n", self.hosts.lan, "link", "set", self.lan_port, "up"])


class Hosts:
    """N nodes on a private LAN; see the module docstring. Use ``make_hosts`` to build one."""

    def __init__(self, workdir: Union[str, Path, None] = None) -> None:
        self.prefix = f"pxfh{os.getpid()}-{next(_SEQ)}"
        self.lan = f"{self.prefix}-lan"
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
            self._own_workdir = True
        else:
            self.workdir = Path(workdir).resolve()
            self._own_workdir = not self.workdir.exists()
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes: Dict[str, Node] = {}
        self.ssh_config = self.workdir / "ssh_config"
        self.hosts_file = self.workdir / "hosts"
        self.rsh_agent = f"ssh -F {self.ssh_config}"
        self._netns: List[str] = []              # namespaces we created (to delete)
        self._started: List[subprocess.Popen] = []
        self._closed = False
        with _OPEN_LOCK:
            _OPEN.append(self)

    def __repr__(self) -> str:
        return f"Hosts({list(self.nodes.values())!r})"

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def names(self) -> List[str]:
        return list(self.nodes)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    # --- setup ----------------------------------------------------------------------------
    def _netns_add(self, name: str) -> None:
        _run(["ip", "netns", "add", name], unavailable=True)
        self._netns.append(name)

    def _setup_common(self) -> None:
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pxf-hosts-host",
              "-f", str(self.workdir / "hostkey")])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pxf-hosts-user",
              "-f", str(self.workdir / "userkey")])
        auth = self.workdir / "authorized_keys"
        shutil.copyfile(self.workdir / "userkey.pub", auth)
        auth.chmod(0o600)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.ssh_config.write_text(
            "Host *\n"
            f"  IdentityFile {self.workdir / 'userkey'}\n"
            "  IdentitiesOnly yes\n"
            "  User root\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
            "  BatchMode yes\n"
            "  ConnectTimeout 5\n"
            # ~0.1-0.3 s less per connection than the default sntrup761 hybrid here
            "  KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org\n")
        # Written once, then only appended to in place: every node bind-mounts this inode.
        self.hosts_file.write_text(
            "127.0.0.1\tlocalhost\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            "ff02::1\tip6-allnodes\n"
            "ff02::2\tip6-allrouters\n")
        self.hosts_file.chmod(0o644)
        self._netns_add(self.lan)
        _run(["ip", "-n", self.lan, "link", "set", "lo", "up"], unavailable=True)
        _run(["ip", "-n", self.lan, "link", "add", "br0", "type", "bridge"], unavailable=True)
        _run(["ip", "-n", self.lan, "link", "set", "br0", "up"], unavailable=True)

    def _write_sshd_config(self, node: Node) -> None:
        w = self.workdir
        node.sshd_config.write_text(
            f"ListenAddress {node.ip}\n"
            f"Port {SSH_PORT}\n"
            f"HostKey {w / 'hostkey'}\n"
            f"PidFile {w / f'sshd_{node.name}.pid'}\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            f"AuthorizedKeysFile {w / 'authorized_keys'}\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "UseDNS no\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "MaxStartups 100:30:200\n"
            "MaxSessions 100\n"
            f"Subsystem sftp {SFTP_SERVER}\n"
            "SetEnv OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1\n")

    def _create_node(self, name: str) -> Node:
        """Namespace, veth to the bridge, address, holder (hostname + /etc/hosts). No sshd."""
        if not _NAME_RE.match(name):
            raise ValueError(f"bad node name {name!r} (letters, digits, '-'; at most 31)")
        if name in self.nodes:
            raise ValueError(f"duplicate node name {name!r}")
        index = len(self.nodes)
        if index >= 250:
            raise ValueError("at most 250 nodes")
        node = Node(self, name, index)
        self.nodes[name] = node
        self._netns_add(node.netns)
        # No IPv6 on the nodes: nothing but the 10.200.0.x addresses (and loopback) exists.
        _run(["nsenter", f"--net=/run/netns/{node.netns}", "sh", "-c",
              "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 "
              "/proc/sys/net/ipv6/conf/default/disable_ipv6; do "
              "[ -w $f ] && echo 1 > $f; done; true"], unavailable=True)
        _run(["ip", "link", "add", "eth0", "netns", node.netns, "type", "veth",
              "peer", "name", node.lan_port, "netns", self.lan], unavailable=True)
        _run(["ip", "-n", self.lan, "link", "set", node.lan_port, "master", "br0", "up"],
             unavailable=True)
        _run(["ip", "-n", node.netns, "addr", "add", f"{node.ip}/{PREFIX_LEN}", "dev", "eth0"],
             unavailable=True)
        _run(["ip", "-n", node.netns, "link", "set", "lo", "up"], unavailable=True)
        _run(["ip", "-n", node.netns, "link", "set", "eth0", "up"], unavailable=True)
        with open(self.hosts_file, "a") as f:        # in place: bound inode stays the same
            f.write(f"{node.ip}\t{name}\n")
        self._write_sshd_config(node)
        log = open(node.holder_log, "wb")
        try:
            node.holder = subprocess.Popen(
                ["ip", "netns", "exec", node.netns,
                 "unshare", "--uts", "--mount", "--propagation", "private",
                 "sh", "-c", 'hostname "$1" && mount --bind "$2" /etc/hosts && echo ready '
                             '&& exec sleep infinity', "holder", name, str(self.hosts_file)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True, cwd="/")
        finally:
            log.close()
        return node

    def _wait_holder(self, node: Node) -> None:
        p = node.holder
        assert p is not None and p.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        buf = b""
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HostsError(f"{node.name}: namespace holder not ready after "
                                     f"{READY_TIMEOUT} s: {_tail(node.holder_log)}")
                ready, _, _ = select.select([p.stdout], [], [], left)
                if ready:
                    chunk = os.read(p.stdout.fileno(), 64)
                    if not chunk:     # exited: unshare/mount refused here
                        p.wait(timeout=CMD_TIMEOUT)
                        raise HostsUnavailable(
                            f"{node.name}: `unshare --uts --mount` + bind /etc/hosts failed "
                            f"(rc {p.returncode}): {_tail(node.holder_log).strip()}")
                    buf += chunk
        finally:
            p.stdout.close()
        if buf.strip() != b"ready":
            raise HostsError(f"{node.name}: unexpected holder output {buf!r}")

    def add_node(self, name: str) -> Node:
        """Add one more node (next address) to a running Hosts; every node's /etc/hosts
        learns its name at once."""
        node = self._create_node(name)
        self._wait_holder(node)
        node.start_sshd()
        return node

    # --- MPI and ssh helpers --------------------------------------------------------------
    def write_hostfile(self, path: Union[str, Path],
                       slots: Union[None, int, Mapping[str, int]] = None) -> Path:
        """Open MPI hostfile by hostname (``nodeA slots=2``): ``slots`` maps node -> slots
        (in that order), or one int for every node (default 1)."""
        if slots is None or isinstance(slots, int):
            slots = {n: slots or 1 for n in self.nodes}
        unknown = [n for n in slots if n not in self.nodes]
        if unknown:
            raise ValueError(f"unknown nodes {unknown}; have {self.names}")
        path = Path(path)
        path.write_text("".join(f"{n} slots={int(s)}\n" for n, s in slots.items()))
        return path

    def mpirun_args(self, interfaces: bool = True) -> List[str]:
        """Extra ``mpirun`` options (Open MPI 4.1) for a job over these nodes, started on one
        of them (``node.run(["mpirun", "--hostfile", HF, "-n", "4", *hosts.mpirun_args(),
        ...])``; the root namespace cannot reach the nodes).

        * ``plm_rsh_agent ssh -F CONFIG``: the only thing that is *needed* (remote orteds are
          launched over ssh with our key; the local node is recognised by its hostname);
        * ``interfaces``: ``oob_tcp_if_include`` and ``btl_tcp_if_include`` = 10.200.0.0/24,
          so orteds call back to mpirun and ranks of different nodes connect over the LAN only
          (never trying a loopback address, which on another node is that node's own).
          Not needed with only ``lo`` + ``eth0`` per node; set for robustness.
        The default BTL selection works (self + vader within a node, since every node has its
        own hostname; tcp across nodes), so no ``btl`` is given: Open MPI refuses an MCA
        parameter listed twice on one command line, and callers may want their own. Callers
        that pass their own ``--mca`` for one of these should use ``mpirun_env()`` instead
        (the command line overrides the environment silently)."""
        args = ["--mca", "plm_rsh_agent", self.rsh_agent]
        if interfaces:
            subnet = f"{SUBNET}.0/{PREFIX_LEN}"
            args += ["--mca", "oob_tcp_if_include", subnet, "--mca", "btl_tcp_if_include", subnet]
        return args

    def mpirun_env(self, interfaces: bool = True) -> Dict[str, str]:
        """``mpirun_args`` as ``OMPI_MCA_*`` environment variables (plus the run-as-root
        pair), for the environment of an ``mpirun`` started on a node."""
        a = self.mpirun_args(interfaces)
        env = {f"OMPI_MCA_{a[i + 1]}": a[i + 2] for i in range(0, len(a), 3)}
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        return env

    # --- teardown -------------------------------------------------------------------------
    def _ns_procs(self) -> List[psutil.Process]:
        procs = []
        for ns in self._netns:
            r = _run(["ip", "netns", "pids", ns], check=False)
            for tok in r.stdout.split():
                if tok.isdigit() and int(tok) != os.getpid():
                    try:
                        procs.append(psutil.Process(int(tok)))
                    except psutil.Error:
                        pass
        return procs

    def close(self) -> None:
        """Stop everything by PID, delete our namespaces, remove the workdir (if ours).
        Idempotent; safe after a half-done setup."""
        if self._closed:
            return
        self._closed = True
        try:
            ours = [p for p in (n.sshd for n in self.nodes.values()) if p is not None]
            ours += [p for p in self._started]
            ours += [n.holder for n in self.nodes.values() if n.holder is not None]
            _terminate_children(ours)
            for p in ours:
                for f in (p.stdout, p.stderr):
                    if f is not None and not f.closed:
                        f.close()
            # Anything else still inside our namespaces (ssh sessions, mpirun, orteds, ranks).
            for _ in range(3):
                rest = self._ns_procs()
                if not rest:
                    break
                processes.terminate(rest, STOP_GRACE)  # SIGTERM, wait, SIGKILL, by PID
            for ns in reversed(self._netns):
                _run(["ip", "netns", "del", ns], check=False)
            self._netns.clear()
        finally:
            with _OPEN_LOCK:
                if self in _OPEN:
                    _OPEN.remove(self)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)


def check_available() -> None:
    """Raise HostsUnavailable if this machine cannot make namespaced hosts at all."""
    if os.geteuid() != 0:
        raise HostsUnavailable(f"network namespaces need root (euid {os.geteuid()})")
    missing = [t for t in ("ip", "unshare", "nsenter", "ssh", "ssh-keygen", "bash", "sleep")
               if shutil.which(t) is None]
    missing += [p for p in (SSHD,) if not os.access(p, os.X_OK)]
    if missing:
        raise HostsUnavailable(f"missing tools: {', '.join(missing)} "
                               "(apt-get install iproute2 util-linux openssh-server)")


def make_hosts(names: Sequence[str] = ("nodeA", "nodeB"),
               workdir: Union[str, Path, None] = None) -> Hosts:
    """Build the nodes ``names`` (addresses 10.200.0.1, .2, ... in this order), each with its
    hostname, /etc/hosts and a running sshd. ``workdir`` (default: a new temp dir, removed by
    ``close``) holds keys, configs and logs. Raises HostsUnavailable if namespaces cannot be
    made here, HostsError if something else fails; either way nothing is left behind."""
    names = list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"need distinct node names, got {names}")
    check_available()
    hosts = Hosts(workdir)
    try:
        hosts._setup_common()
        for name in names:
            hosts._create_node(name)
        for node in hosts.nodes.values():      # holders start in parallel
            hosts._wait_holder(node)
        for node in hosts.nodes.values():
            node._spawn_sshd()
        for node in hosts.nodes.values():
            node.start_sshd()
    except BaseException:
        hosts.close()
        raise
    return hosts
