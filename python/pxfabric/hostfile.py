"""Hosts for ``pxcluster``: Open MPI hostfiles, the controller's engine-facing address, and the
pre-flight check (``pxcluster check --hostfile F``).

* :func:`parse_hostfile` reads the Open MPI format (``host [slots=N] [max_slots=M]``, ``#``
  comments, blank lines, ``user@host``) and names the file and line of anything it refuses.
* :func:`choose_controller_address` picks the local address that routes to the hostfile's
  hosts (``--engine-ip=ADDR``), ``*`` when they route through different local addresses, or
  nothing when every host is this one (the controller then stays on 127.0.0.1).
* :func:`check_hosts` logs in to every host with the agent mpirun will use (in parallel,
  bounded) and runs there what a rank needs: ``pxengine --version``, the Python packages, and
  a TCP connection back to the controller's address; :class:`HostCheck` says which step failed,
  in ssh's or the command's own words, and what to change.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

PYTHON = "/usr/bin/python3"
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
DEFAULT_CHECK_TIMEOUT = 30.0
MAX_PARALLEL = 16

# Controller options that fix where it listens; the user's choice then stands.
ADDRESS_OPTIONS = ("ip", "engine-ip", "client-ip")
_TRAIT_ADDRESS = {"ip": "ip", "engine_ip": "engine-ip", "client_ip": "client-ip"}
_CONFIG_ADDRESS_RE = re.compile(
    r"^\s*c\.(?:IPController|HubFactory)\.(ip|engine_ip|client_ip)\s*=\s*(.+?)\s*(?:#.*)?$")


class HostfileError(ValueError):
    """A hostfile cannot be used; the message names the file, the line and the host."""


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

@dataclass
class HostEntry:
    """One host line of a hostfile."""
    name: str                     # the host as mpirun sees it (without ``user@``)
    lineno: int
    line: str
    path: str = ""
    user: Optional[str] = None
    slots: Optional[int] = None
    max_slots: Optional[int] = None

    @property
    def target(self) -> str:
        """What ssh logs in to (``user@host`` when the hostfile gives a user)."""
        return f"{self.user}@{self.name}" if self.user else self.name

    @property
    def where(self) -> str:
        return f"{self.path or 'hostfile'} line {self.lineno}"


_SLOTS_KEYS = {"slots", "slot", "cpu", "cpus", "count"}
_MAX_KEYS = {"max_slots", "max-slots", "slots_max", "slots-max", "max_slot"}
_USER_KEYS = {"user", "username"}
_HOST_RE = re.compile(r"^[A-Za-z0-9_.:%\[\]-]+$")


def parse_hostfile_text(text: str, path: str = "") -> List[HostEntry]:
    """The host lines of an Open MPI hostfile (``#`` comments and blank lines skipped)."""
    entries: List[HostEntry] = []
    where = path or "hostfile"
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        # ``slots = 2`` and ``slots=2`` alike
        tokens = re.sub(r"\s*=\s*", "=", line).split()
        host, opts = tokens[0], tokens[1:]
        user = None
        if "@" in host:
            user, host = host.rsplit("@", 1)
        if not host or not _HOST_RE.match(host) or "=" in host:
            raise HostfileError(f"{where} line {lineno}: {raw.strip()!r}: expected a host name "
                                "first (`nodeA slots=2`)")
        entry = HostEntry(host, lineno, raw.strip(), path, user)
        for opt in opts:
            key, eq, value = opt.partition("=")
            key = key.lower()
            if not eq:
                raise HostfileError(f"{where} line {lineno}: {raw.strip()!r}: {opt!r} is not "
                                    "KEY=VALUE (Open MPI hostfiles take slots=N, max_slots=N)")
            if key in _USER_KEYS:
                entry.user = value
                continue
            if key not in _SLOTS_KEYS and key not in _MAX_KEYS:
                raise HostfileError(f"{where} line {lineno}: {raw.strip()!r}: unknown keyword "
                                    f"{key!r} (Open MPI hostfiles take slots=N, max_slots=N)")
            try:
                n = int(value)
                if n < 0:
                    raise ValueError
            except ValueError:
                raise HostfileError(f"{where} line {lineno}: {raw.strip()!r}: {key} must be a "
                                    f"non-negative integer, not {value!r}") from None
            if key in _SLOTS_KEYS:
                entry.slots = n
            else:
                entry.max_slots = n
        if entry.slots is not None and entry.max_slots is not None \
                and entry.max_slots < entry.slots:
            raise HostfileError(f"{where} line {lineno}: {raw.strip()!r}: max_slots "
                                f"({entry.max_slots}) is less than slots ({entry.slots})")
        entries.append(entry)
    return entries


def parse_hostfile(path) -> List[HostEntry]:
    """The hosts of the Open MPI hostfile ``path``; :class:`HostfileError` if unusable."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as e:
        raise HostfileError(f"hostfile {path}: cannot read it ({e.strerror or e})") from None
    entries = parse_hostfile_text(text, str(path))
    if not entries:
        raise HostfileError(f"hostfile {path} names no host (one `host slots=N` per line)")
    return entries


def unique_hosts(entries: Iterable[HostEntry]) -> List[HostEntry]:
    """First entry per host name, in file order (Open MPI adds the slots of repeated lines)."""
    seen: Dict[str, HostEntry] = {}
    for e in entries:
        seen.setdefault(e.name, e)
    return list(seen.values())


# --------------------------------------------------------------------------------------------
# This host, names and routes
# --------------------------------------------------------------------------------------------

def local_addresses() -> set:
    """IPv4 addresses of this host's interfaces (plus all of 127/8)."""
    out = {"127.0.0.1"}
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family == socket.AF_INET:
                    out.add(a.address)
    except Exception:  # noqa: BLE001 - psutil missing or refusing: names still work
        pass
    return out


def local_names() -> set:
    names = {"localhost", "localhost.localdomain"}
    h = socket.gethostname()
    names.update({h, h.split(".")[0]})
    return names


def resolve(host: str) -> List[str]:
    """IPv4 addresses of ``host`` (OSError from the resolver if none)."""
    infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    out: List[str] = []
    for info in infos:
        ip = info[4][0]
        if ip not in out:
            out.append(ip)
    if not out:
        raise OSError(f"no IPv4 address for {host}")
    return out


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("localhost", "::1")


def source_address(ip: str) -> str:
    """The local address this host sends from to reach ``ip`` (a UDP socket's connect picks
    the route; nothing is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((ip, 9))
        return s.getsockname()[0]
    finally:
        s.close()


def _unresolved(e: HostEntry, err: BaseException) -> str:
    why = getattr(err, "strerror", None) or str(err)
    return (f"{e.name} does not resolve to an address here ({e.where}: {e.line!r}; {why}): "
            "fix the name in the hostfile, or add it to /etc/hosts or DNS")


@dataclass
class ResolvedHost:
    entry: HostEntry
    ip: str
    local: bool
    source: Optional[str] = None        # local address routing to it (remote hosts)


def resolve_hosts(entries: Sequence[HostEntry]) -> List[ResolvedHost]:
    """Resolve every distinct host; :class:`HostfileError` naming the host and its line for a
    name that resolves to nothing or has no route from here."""
    here_names, here_addrs = local_names(), local_addresses()
    out = []
    for e in unique_hosts(entries):
        try:
            ips = resolve(e.name)
        except (OSError, UnicodeError) as err:
            raise HostfileError(f"host {_unresolved(e, err)}") from None
        local = e.name in here_names or any(ip in here_addrs or is_loopback(ip) for ip in ips)
        rh = ResolvedHost(e, ips[0], local)
        if not local:
            try:
                rh.source = source_address(rh.ip)
            except OSError as err:
                raise HostfileError(
                    f"host {e.name!r} ({e.where}) resolves to {rh.ip}, but this host has no "
                    f"route to it ({err.strerror or err})") from None
        out.append(rh)
    return out


# --------------------------------------------------------------------------------------------
# The controller's address
# --------------------------------------------------------------------------------------------

def _option_values(args: Sequence[str]) -> Dict[str, str]:
    """``--ip``/``--engine-ip``/``--client-ip`` (and the IPController./HubFactory. trait
    spellings) given in a pxcontroller argument list -> {canonical name: value}."""
    out: Dict[str, str] = {}
    args = list(args)
    for i, a in enumerate(args):
        if not a.startswith("--"):
            continue
        name, eq, value = a[2:].partition("=")
        for prefix in ("IPController.", "HubFactory."):
            if name.startswith(prefix) and name[len(prefix):] in _TRAIT_ADDRESS:
                name = _TRAIT_ADDRESS[name[len(prefix):]]
        if name in ADDRESS_OPTIONS:
            if not eq:
                value = args[i + 1] if i + 1 < len(args) else ""
            out[name] = value.strip("'\"")
    return out


def address_settings(controller_args: Sequence[str],
                     profile_dir: Optional[Path] = None) -> Dict[str, str]:
    """Where the user fixed the controller's addresses: the profile's ipcontroller_config.py
    (``c.IPController.ip = ...``, ``c.HubFactory.engine_ip = ...``) overridden by the command
    line, as pxcontroller reads them."""
    found: Dict[str, str] = {}
    if profile_dir is not None:
        cfg = Path(profile_dir) / "ipcontroller_config.py"
        try:
            for line in cfg.read_text(errors="replace").splitlines():
                m = _CONFIG_ADDRESS_RE.match(line)
                if m:
                    found[_TRAIT_ADDRESS[m.group(1)]] = m.group(2).strip().strip("'\"")
        except OSError:
            pass
    found.update(_option_values(controller_args))
    return found


@dataclass
class ControllerAddress:
    """What pxcluster adds to the controller's command line, and why (one line)."""
    args: List[str] = field(default_factory=list)
    engine_ip: str = "127.0.0.1"       # where engines will dial (as the controller binds it)
    reason: str = ""
    warning: Optional[str] = None      # the user's choice cannot serve the remote hosts
    hosts: List[ResolvedHost] = field(default_factory=list)

    def target_for(self, host: ResolvedHost) -> str:
        """The address ``host`` must reach the controller at."""
        if self.engine_ip in ("*", "0.0.0.0"):
            return host.source or "127.0.0.1"
        return self.engine_ip


def choose_controller_address(entries: Sequence[HostEntry], controller_args: Sequence[str] = (),
                              profile_dir: Optional[Path] = None) -> ControllerAddress:
    """The controller's engine-facing address for a job over ``entries``.

    Hosts other than this one need an address they can reach: the local address that routes
    to them (``--engine-ip=ADDR``; clients stay on loopback), or ``--engine-ip=*`` with
    ``--location`` when they route through different local addresses. Nothing is added when
    the user chose (``--ip``/``--engine-ip``/``--client-ip``, on the command line or in the
    profile's config) or when every host is this one.
    """
    hosts = resolve_hosts(entries)
    remote = [h for h in hosts if not h.local]
    given = address_settings(controller_args, profile_dir)
    out = ControllerAddress(hosts=hosts)
    if given:
        ip = given.get("engine-ip") or given.get("ip") or "127.0.0.1"
        out.engine_ip = ip
        spelled = ", ".join(f"--{k}={v}" for k, v in given.items())
        out.reason = f"the controller listens for engines on {ip} (as given: {spelled})"
        if remote and is_loopback(ip):
            names = ", ".join(h.entry.name for h in remote)
            out.warning = (
                f"the controller listens for engines on {ip} only ({spelled}), but the hostfile "
                f"names other hosts ({names}): ranks there cannot reach it. Drop that option "
                f"(pxcluster then picks the address that routes to them) or give "
                f"--engine-ip=ADDR with an address they reach")
        return out
    if not remote:
        out.reason = ("every host in the hostfile is this host: the controller stays on "
                      "127.0.0.1")
        return out
    sources = sorted({h.source for h in remote if h.source})
    if len(sources) == 1:
        out.engine_ip = sources[0]
        out.args = [f"--engine-ip={sources[0]}"]
        names = ", ".join(f"{h.entry.name} ({h.ip})" for h in remote)
        out.reason = (f"the controller listens for engines on {sources[0]}, the address of this "
                      f"host that routes to {names}; clients stay on 127.0.0.1")
    else:
        # Rank 0 (the only rank that dials the controller) runs on the hostfile's first host.
        first = hosts[0] if not hosts[0].local else remote[0]
        location = first.source or sources[0]
        out.engine_ip = "*"
        out.args = ["--engine-ip=*"]
        if not any("location" in a for a in controller_args):
            out.args.append(f"--location={location}")
        routes = ", ".join(f"{h.entry.name} via {h.source}" for h in remote)
        out.reason = (f"the hosts route through different local addresses ({routes}): the "
                      f"controller listens for engines on all interfaces, location {location}; "
                      "clients stay on 127.0.0.1")
    return out


# --------------------------------------------------------------------------------------------
# The rsh agent mpirun uses
# --------------------------------------------------------------------------------------------

def rsh_agent(mpi_args: Sequence[str] = (), env: Optional[Mapping[str, str]] = None) -> List[str]:
    """The remote-shell command mpirun launches its daemons with: ``--mca plm_rsh_agent X``
    in ``mpi_args``, else ``$OMPI_MCA_plm_rsh_agent``, else ``ssh`` (Open MPI's ``ssh : rsh``
    alternatives: the first one installed)."""
    env = os.environ if env is None else env
    value = None
    args = list(mpi_args)
    for i, a in enumerate(args):
        if a in ("--mca", "-mca", "--gmca", "-gmca") and i + 2 < len(args) and \
                args[i + 1] in ("plm_rsh_agent", "orte_rsh_agent", "pls_rsh_agent"):
            value = args[i + 2]
    if value is None:
        for var in ("OMPI_MCA_plm_rsh_agent", "OMPI_MCA_orte_rsh_agent"):
            if env.get(var):
                value = env[var]
                break
    if not value:
        value = "ssh : rsh"
    choices = [shlex.split(c) for c in value.split(":") if c.strip()]
    for argv in choices:
        if argv and shutil.which(argv[0]):
            return argv
    return choices[0] if choices else ["ssh"]


def ssh_command(agent: Sequence[str], target: str) -> List[str]:
    """``agent`` + BatchMode/ConnectTimeout (for ssh) + target + ``/bin/sh -s`` (the script
    comes on stdin, whatever the login shell is)."""
    argv = list(agent)
    if Path(argv[0]).name.startswith("ssh"):
        argv += SSH_OPTIONS
    return argv + [target, "/bin/sh", "-s"]


# --------------------------------------------------------------------------------------------
# The pre-flight check
# --------------------------------------------------------------------------------------------

_MARK = "@@pxf"
_PY_IMPORTS = "import mpi4py, ipyparallel"
_PY_CONNECT = ("import socket, sys\n"
               "try:\n"
               "    socket.create_connection((sys.argv[1], int(sys.argv[2])), 3).close()\n"
               "except socket.timeout:\n"
               "    print('no answer within 3 s (timed out): a firewall dropping packets?'); sys.exit(1)\n"
               "except OSError as e:\n"
               "    print(e.strerror or e); sys.exit(1)\n")


def remote_script(engine_argv: Optional[Sequence[str]], python: str, target: Tuple[str, int],
                  pythonpath: str = "", prefix: Optional[str] = None, orted: bool = True) -> str:
    """The /bin/sh script a host runs: one ``@@pxf STEP RC OUTPUT`` line per step."""
    q = shlex.quote
    lines = [
        "exec 2>&1",
        f"step() {{ s=$1; shift; out=$(\"$@\" 2>&1); rc=$?; "
        f"printf '{_MARK} %s %s %s\\n' \"$s\" \"$rc\" \"$(printf %s \"$out\" | tr '\\n' ' ')\"; }}",
        "step hostname hostname",
    ]
    if pythonpath:
        lines.append(f"PYTHONPATH={q(pythonpath)}; export PYTHONPATH")
    if not orted:
        pass                          # this host: mpirun runs its ranks itself
    elif prefix:
        lines.append(f"if [ -x {q(prefix + '/bin/orted')} ]; then echo '{_MARK} orted 0 ok'; "
                     f"else echo {q(_MARK + ' orted 127 ' + prefix + '/bin/orted missing')}; fi")
    else:
        lines.append(f"if command -v orted >/dev/null 2>&1; then echo '{_MARK} orted 0 ok'; "
                     f"else echo \"{_MARK} orted 127 PATH=$PATH\"; fi")
    if engine_argv:
        exe = engine_argv[0]
        lines.append(f"if command -v {q(exe)} >/dev/null 2>&1; then "
                     f"step pxengine {' '.join(q(a) for a in engine_argv)} --version; "
                     f"else echo '{_MARK} pxengine 127 missing'; fi")
    lines.append(f"step python {q(python)} -c {q(_PY_IMPORTS)}")
    lines.append(f"step connect {q(python)} -c {q(_PY_CONNECT)} {q(target[0])} {int(target[1])}")
    return "\n".join(lines) + "\n"


@dataclass
class HostCheck:
    host: str
    ok: bool
    step: str                      # "resolve", "ssh", "orted", "pxengine", "python", "connect", "ok"
    message: str                   # the line pxcluster prints (after "host: ")
    where: str = ""
    hostname: Optional[str] = None
    version: Optional[str] = None

    def line(self) -> str:
        return f"{self.host}: {self.message}"


def _ssh_problem(host: str, stderr: str, agent: Sequence[str]) -> Tuple[str, str]:
    """(step, message) for an ssh that could not run the script (ssh exit 255)."""
    lines = [ln.strip() for ln in stderr.splitlines()
             if ln.strip() and not ln.startswith("Warning: Permanently added")]
    text = "; ".join(lines[-2:]) if lines else "no output"
    agent_s = " ".join(agent)
    if "Permission denied" in text:
        return "ssh", (f"ssh login refused ({text}): add your key to {host}'s "
                       "~/.ssh/authorized_keys (ssh-copy-id), load it into your ssh agent, or fix "
                       f"IdentityFile in ~/.ssh/config / plm_rsh_agent (now `{agent_s}`)")
    if "Connection refused" in text:
        return "ssh", (f"ssh connection refused ({text}): {host} is up but no sshd answers on that "
                       f"port: start sshd on {host}, or fix Port in ~/.ssh/config")
    if "Could not resolve hostname" in text or "Name or service not known" in text:
        return "ssh", (f"ssh cannot resolve the name ({text}): fix the hostfile or add {host} to "
                       "/etc/hosts, DNS or ~/.ssh/config (HostName)")
    if any(s in text for s in ("timed out", "No route to host", "Network is unreachable",
                               "Connection closed", "Connection reset")):
        return "ssh", (f"unreachable ({text}): check that {host} is up and reachable from this "
                       "host (network, firewall, ~/.ssh/config HostName/ProxyJump)")
    if "Host key verification failed" in text or "HOST IDENTIFICATION HAS CHANGED" in text:
        return "ssh", (f"ssh host key not accepted ({text}): `ssh {host}` once to check and "
                       "accept it, or set StrictHostKeyChecking accept-new in ~/.ssh/config")
    return "ssh", (f"ssh failed ({text}): run `{agent_s} {host} hostname` to see why; mpirun "
                   "needs a password-less (BatchMode) login")


def _evaluate(host: ResolvedHost, rc: int, out: str, err: str, agent: Sequence[str],
              engine_argv: Optional[Sequence[str]], target: Tuple[str, int],
              python: str, via_ssh: bool) -> HostCheck:
    name = host.entry.name
    steps: Dict[str, Tuple[int, str]] = {}
    for line in out.splitlines():
        if line.startswith(_MARK + " "):
            parts = line[len(_MARK) + 1:].split(" ", 2)
            if len(parts) >= 2 and parts[1].lstrip("-").isdigit():
                steps[parts[0]] = (int(parts[1]), parts[2].strip() if len(parts) > 2 else "")
    if via_ssh and rc == 255 and "hostname" not in steps:
        step, msg = _ssh_problem(name, err or out, agent)
        return HostCheck(name, False, step, msg, host.entry.where)
    if "hostname" not in steps:
        text = " ".join((err or out).split())[-300:] or f"exit status {rc}"
        return HostCheck(name, False, "ssh", f"the login shell did not run the check ({text})",
                         host.entry.where)
    hc = HostCheck(name, True, "ok", "", host.entry.where, hostname=steps["hostname"][1])
    rc_, txt = steps.get("orted", (0, ""))
    if rc_:
        return HostCheck(name, False, "orted",
                         f"Open MPI's orted not found on {name} ({txt}): install Open MPI there "
                         "(the same version as here) or pass --mpi-args '--prefix DIR'",
                         host.entry.where, hc.hostname)
    if engine_argv:
        rc_, txt = steps.get("pxengine", (127, "missing"))
        if rc_ == 127 and txt in ("missing", ""):
            return HostCheck(name, False, "pxengine",
                             f"pxengine not found at {engine_argv[0]}: install pxfabric there "
                             "(same path) or set PXF_ENGINE", host.entry.where, hc.hostname)
        if rc_:
            return HostCheck(name, False, "pxengine",
                             f"`{engine_argv[0]} --version` failed on {name} (exit {rc_}: "
                             f"{txt[-300:]}): rebuild or reinstall pxfabric there",
                             host.entry.where, hc.hostname)
        hc.version = txt
    rc_, txt = steps.get("python", (1, "not run"))
    if rc_:
        missing = txt.rsplit("Error:", 1)[-1].strip() if "Error" in txt else txt
        return HostCheck(name, False, "python",
                         f"{python} cannot import mpi4py/ipyparallel on {name} ({missing[-200:]}): "
                         "install python3-mpi4py and python3-ipyparallel there",
                         host.entry.where, hc.hostname)
    rc_, txt = steps.get("connect", (1, "not run"))
    if rc_:
        hint = (f"{target[0]} is loopback, which other hosts cannot reach: drop "
                f"--ip={target[0]} (pxcluster then picks the address that routes to them) or "
                "give --engine-ip=ADDR" if is_loopback(target[0]) else
                f"open TCP from {name} to this host (firewall), or choose the address with "
                "--controller-args=--engine-ip=ADDR (and --ports for a firewall's range)")
        return HostCheck(name, False, "connect",
                         f"cannot reach the controller address {target[0]}:{target[1]} from "
                         f"{name}: {txt or f'exit {rc_}'}: {hint}", host.entry.where, hc.hostname)
    bits = [f"hostname {hc.hostname}"]
    if hc.version:
        bits.append(hc.version)
    bits.append(f"controller address {target[0]} reachable")
    if not via_ssh:
        bits.append("this host: mpirun starts its ranks without ssh")
    hc.message = "OK (" + ", ".join(bits) + ")"
    return hc


class _Listener:
    """A temporary TCP listener standing in for the controller (accepts and closes)."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind = "0.0.0.0" if ip in ("*", "0.0.0.0") else ip
        self.sock.bind((bind, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                conn.close()
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        self.sock.close()


def _mpi_prefix(mpi_args: Sequence[str]) -> Optional[str]:
    args = list(mpi_args)
    for i, a in enumerate(args):
        if a in ("--prefix", "-prefix") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--prefix="):
            return a.split("=", 1)[1]
    return None


def check_hosts(entries: Sequence[HostEntry], *, engine_argv: Optional[Sequence[str]],
                mpi_args: Sequence[str] = (), controller: Optional[ControllerAddress] = None,
                port: Optional[int] = None, timeout: float = DEFAULT_CHECK_TIMEOUT,
                python: str = PYTHON, pythonpath: str = "",
                env: Optional[Mapping[str, str]] = None) -> List[HostCheck]:
    """Check every distinct host of ``entries`` in parallel (each bounded by ``timeout``).

    ``controller`` is the address the controller listens on for engines (default: what
    :func:`choose_controller_address` picks); with ``port`` the hosts dial that port (a
    running controller), else a temporary listener here on that address.
    """
    env = dict(os.environ if env is None else env)
    agent = rsh_agent(mpi_args, env)
    prefix = _mpi_prefix(mpi_args)
    results: Dict[str, HostCheck] = {}
    resolved: List[ResolvedHost] = []
    for e in unique_hosts(entries):
        try:
            resolve(e.name)
        except (OSError, UnicodeError) as err:
            results[e.name] = HostCheck(e.name, False, "resolve", _unresolved(e, err), e.where)
            continue
        try:
            resolved += resolve_hosts([e])
        except HostfileError as err:       # resolves, but no route from here
            results[e.name] = HostCheck(e.name, False, "route", str(err), e.where)
    if controller is None:
        try:
            controller = choose_controller_address([h.entry for h in resolved])
        except HostfileError:
            controller = ControllerAddress()
    listener = None
    if port is None and resolved:
        try:
            listener = _Listener(controller.engine_ip)
        except OSError as err:
            raise HostfileError(f"cannot listen on {controller.engine_ip} here to test it "
                                f"({err.strerror or err}): is that an address of this host?") \
                from None
        port = listener.port

    def one(h: ResolvedHost) -> HostCheck:
        target = (controller.target_for(h), int(port or 0))
        script = remote_script(engine_argv, python, target, pythonpath, prefix,
                               orted=not h.local)
        argv = ["/bin/sh", "-s"] if h.local else ssh_command(agent, h.entry.target)
        try:
            p = subprocess.run(argv, input=script, capture_output=True, text=True,
                               timeout=timeout, env=env, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            if f"{_MARK} hostname" in out:
                what = "logged in, but the checks there did not finish"
            else:
                what = "no answer from ssh"
            return HostCheck(h.entry.name, False, "ssh",
                             f"{what} within {timeout:.0f}s (`{' '.join(argv[:-2])}`): is "
                             f"{h.entry.name} overloaded, or asking for a password?",
                             h.entry.where)
        except OSError as e:
            return HostCheck(h.entry.name, False, "ssh",
                             f"cannot run `{argv[0]}` here ({e.strerror or e}): install "
                             "openssh-client or fix plm_rsh_agent", h.entry.where)
        return _evaluate(h, p.returncode, p.stdout, p.stderr, agent, engine_argv, target,
                         python, via_ssh=not h.local)

    try:
        if resolved:
            with concurrent.futures.ThreadPoolExecutor(min(MAX_PARALLEL, len(resolved))) as pool:
                for h, hc in zip(resolved, pool.map(one, resolved)):
                    results[h.entry.name] = hc
    finally:
        if listener is not None:
            listener.close()
    return [results[e.name] for e in unique_hosts(entries) if e.name in results]


def format_checks(checks: Sequence[HostCheck]) -> str:
    return "\n".join(c.line() for c in checks)


def check_hostfile(hostfile, *, engine_argv: Optional[Sequence[str]],
                   mpi_args: Sequence[str] = (), controller_args: Sequence[str] = (),
                   profile_dir: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
                   timeout: float = DEFAULT_CHECK_TIMEOUT) -> List[HostCheck]:
    """``pxcluster check``: the hosts of ``hostfile`` against the address a start with these
    ``controller_args`` would listen on (a temporary listener stands in for the controller)."""
    entries = parse_hostfile(hostfile)
    resolvable = []
    for e in unique_hosts(entries):
        try:
            resolve_hosts([e])
            resolvable.append(e)
        except HostfileError:
            pass                      # check_hosts reports it on that host's line
    plan = (choose_controller_address(resolvable, controller_args, profile_dir)
            if resolvable else ControllerAddress())
    env = dict(os.environ if env is None else env)
    return check_hosts(entries, engine_argv=engine_argv, mpi_args=mpi_args, controller=plan,
                       timeout=timeout, pythonpath=env.get("PYTHONPATH", ""), env=env)


# --------------------------------------------------------------------------------------------
# After a start: where the ranks run, and why a start failed
# --------------------------------------------------------------------------------------------

def group_hosts(engines: Mapping[str, dict]) -> List[dict]:
    """``pxf_engines_request``'s ``{id: {host, rank, ...}}`` grouped by host in engine-id
    order: ``[{"host": "nodeA", "engines": [0, 1], "ranks": [0, 1]}, ...]`` (ranks are None
    for engines outside an MPI job)."""
    groups: Dict[str, dict] = {}
    for eid in sorted(engines, key=int):
        info = engines[eid] or {}
        host = str(info.get("host") or "?")
        g = groups.setdefault(host, {"host": host, "engines": [], "ranks": []})
        g["engines"].append(int(eid))
        g["ranks"].append(info.get("rank"))
    return list(groups.values())


def _ranges(nums: Sequence[int]) -> str:
    out, nums = [], sorted(nums)
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(out)


def format_hosts(groups: Optional[Sequence[dict]]) -> str:
    """``nodeA (ranks 0-1), nodeB (ranks 2-3)`` (engine ids where ranks are unknown)."""
    if not groups:
        return "-"
    parts = []
    for g in groups:
        engines = list(g.get("engines") or [])
        ranks = [r for r in g.get("ranks") or [] if r is not None]
        nums, word = (ranks, "rank") if ranks and len(ranks) == len(engines) else (engines, "engine")
        parts.append(f"{g['host']} ({word}{'s' if len(nums) != 1 else ''} {_ranges(nums)})")
    return ", ".join(parts)


_RANK_ERROR_MARKERS = ("registration failed", "cannot reach the controller", "CRITICAL")
DIAGNOSIS_TIMEOUT = 15.0    # seconds per host for the check run after a failed start


def rank_errors(log, limit: int = 5) -> List[str]:
    """The ranks' own error lines (rank 0's `registration failed: cannot reach the controller
    at ...`) from the engine job's log."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln.strip() for ln in lines if any(m in ln for m in _RANK_ERROR_MARKERS)][-limit:]


def diagnose_failed_start(entries: Sequence[HostEntry], plan: Optional[ControllerAddress], *,
                          mpi_args: Sequence[str], engine_info: Mapping, engine_log,
                          env: Mapping[str, str], engine_argv: Optional[Sequence[str]]) -> str:
    """Text for a start that failed: the ranks' own errors and, with a hostfile, every host
    checked against the running controller (which host, which step). Never raises."""
    out = []
    errors = rank_errors(engine_log)
    if errors:
        out.append("rank errors:\n" + "\n".join("    " + e for e in errors))
    if entries:
        try:
            # the port rank 0 dials: pxengine's fabric link, a stock engine's registration
            port = (engine_info.get("pxf_fabric") if engine_argv else None) \
                or engine_info.get("registration")
            checks = check_hosts(entries, engine_argv=engine_argv, mpi_args=mpi_args,
                                 controller=plan, port=int(port) if port else None,
                                 timeout=DIAGNOSIS_TIMEOUT,
                                 pythonpath=env.get("PYTHONPATH", ""), env=env)
            if any(not c.ok for c in checks):
                out.append("the hosts, checked (`pxcluster check`):\n"
                           + "\n".join("    " + c.line() for c in checks))
            else:
                out.append("every host passes `pxcluster check` (ssh, pxengine, Python, the "
                           "controller's address): see mpirun's output below")
        except Exception as e:  # noqa: BLE001 - a diagnosis must not hide the failure itself
            out.append(f"(could not check the hosts: {e})")
    return "".join(part + "\n" for part in out)
