"""``pxcluster connect`` / ``disconnect``: drive a remote cluster from a laptop through ``pxtunnel``.

``pxcluster connect [user@]host`` starts ``pxtunnel`` (build/bin/pxtunnel or ``$PXF_TUNNEL``) in
the background, in its own session, with its output in the local profile's log dir
(``$IPYTHONDIR/profile_NAME/log/pxtunnel-<cluster id or default>.log``). pxtunnel opens ONE SSH
session (libssh) to the host, fetches the controller's client connection file there, forwards
its ports to 127.0.0.1 and writes ``$IPYTHONDIR/profile_NAME/security/ipcontroller[-ID]-client.json``
(NAME = ``--as`` or the host). ``connect`` waits (bounded) for pxtunnel's ready line, records
its PID and start time in ``profile_NAME/security/pxtunnel-<id or default>.json`` and prints how
to connect: ``ipp.Client(profile='NAME')``, the stock client, no ``sshserver=``.

``pxcluster disconnect NAME`` stops that process by PID (checked against its start time):
SIGTERM, SIGKILL after a grace period; pxtunnel removes its local connection file itself, and
``disconnect`` removes it if pxtunnel could not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil

from pxfabric import cluster as cl
from pxfabric import paths

DEFAULT_TUNNEL = paths.program("pxtunnel")
CONNECT_TIMEOUT = 30.0     # seconds for pxtunnel's ready line
DISCONNECT_GRACE = 5.0     # SIGTERM -> SIGKILL
READY_MARK = "pxtunnel: forwarding "


def tunnel_program() -> List[str]:
    """``$PXF_TUNNEL`` (a command line) or ``<repo>/build/bin/pxtunnel``."""
    env = os.environ.get("PXF_TUNNEL")
    argv = env.split() if env else [str(DEFAULT_TUNNEL)]
    if not argv or not shutil.which(argv[0]):
        where = f"$PXF_TUNNEL={env!r}" if env else str(DEFAULT_TUNNEL)
        raise cl.ClusterError(f"pxtunnel not found ({where} does not exist or is not "
                              "executable); build it with `bash scripts/build.sh` (needs "
                              "libssh-dev)")
    return argv


def tunnel_paths(name: str, cluster_id: str = "") -> Dict[str, Path]:
    pdir = cl.ipython_dir() / f"profile_{name}"
    tag = cl._tag(cluster_id)
    return {"profile_dir": pdir,
            "state": pdir / "security" / f"pxtunnel-{tag}.json",
            "log": pdir / "log" / f"pxtunnel-{tag}.log",
            "client_file": cl.connection_files(pdir, cluster_id)["client"]}


def _errors(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errs = [ln for ln in lines if "error" in ln.lower()]
    return "\n".join(errs[-5:] or lines[-10:]) or "(empty log)"


def connect(target: str, *, name: Optional[str] = None, remote_profile_dir: Optional[str] = None,
            remote_file: Optional[str] = None, cluster_id: str = "", jump: Optional[str] = None,
            ssh_config: Optional[str] = None, identity: Optional[str] = None, port: int = 0,
            accept_new_host_key: bool = False, known_hosts: Optional[str] = None,
            timeout: float = CONNECT_TIMEOUT, say=cl._say) -> dict:
    """Start pxtunnel for ``target`` and return the recorded state once it forwards."""
    host = target.rsplit("@", 1)[-1]
    name = name or host
    if not name or "/" in name:
        raise cl.ClusterError(f"bad profile name {name!r} (--as NAME)")
    paths = tunnel_paths(name, cluster_id)
    cl.resolve_profile_dir(profile_dir=str(paths["profile_dir"]), create=True)
    with cl._profile_lock(paths["profile_dir"]):
        old = cl._read_json(paths["state"])
        if old and cl._process(old) is not None:
            raise cl.ClusterError(
                f"profile '{name}' is already connected to {old.get('target')} (pxtunnel pid "
                f"{old['pid']}); `pxcluster disconnect {name}` first")
        argv = tunnel_program() + [target, "--local-profile-dir", str(paths["profile_dir"])]
        for flag, val in (("--remote-profile-dir", remote_profile_dir),
                          ("--remote-file", remote_file), ("-J", jump), ("-F", ssh_config),
                          ("-i", identity), ("--known-hosts", known_hosts),
                          ("-p", str(port) if port else None)):
            if val:
                argv += [flag, str(val)]
        if cluster_id:
            argv += ["--cluster-id", cluster_id]
        if accept_new_host_key:
            argv.append("--accept-new-host-key")
        t0 = time.monotonic()
        with open(paths["log"], "w") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        ready = None
        while ready is None:
            with contextlib.suppress(OSError):
                for line in paths["log"].read_text(errors="replace").splitlines():
                    if line.startswith(READY_MARK):
                        ready = line
            if ready is not None:
                break
            if proc.poll() is not None:
                raise cl.ClusterError(f"pxtunnel to {target} failed (exit status "
                                      f"{proc.returncode}; log {paths['log']}):\n"
                                      f"{_errors(paths['log'])}")
            if time.monotonic() - t0 > timeout:
                cl.terminate([psutil.Process(proc.pid)], grace=2.0)
                proc.wait(5)
                raise cl.ClusterError(f"pxtunnel to {target} not ready after {timeout:.0f} s; "
                                      f"stopped it (log {paths['log']}):\n{_errors(paths['log'])}")
            time.sleep(0.05)
        state = dict(cl._proc_record(psutil.Process(proc.pid)), target=target, name=name,
                     cluster_id=cluster_id, argv=argv, log=str(paths["log"]),
                     client_file=str(paths["client_file"]), state_file=str(paths["state"]),
                     ready_seconds=round(time.monotonic() - t0, 2), ready_line=ready)
        cl._write_json_atomic(paths["state"], state)
    say(f"{ready[len('pxtunnel: '):]}")
    say(f"local profile '{name}' (log {paths['log']}); ready in {state['ready_seconds']:.1f}s")
    return state


def connect_hint(state: dict) -> str:
    kw = f"profile={state['name']!r}"
    if state.get("cluster_id"):
        kw += f", cluster_id={state['cluster_id']!r}"
    return f"rc = ipp.Client({kw})"


def disconnect(name: str, cluster_id: str = "", grace: float = DISCONNECT_GRACE) -> dict:
    """Stop the pxtunnel of profile ``name`` (by recorded PID); check its local file is gone."""
    paths = tunnel_paths(name, cluster_id)
    state = cl._read_json(paths["state"])
    if state is None:
        raise cl.ClusterError(f"no tunnel recorded for profile '{name}'"
                              f"{' cluster id ' + cluster_id if cluster_id else ''} "
                              f"({paths['state']} does not exist)")
    proc = cl._process(state)
    summary = {"pid": state.get("pid"), "was_running": proc is not None, "killed": False,
               "removed_file": False}
    if proc is not None:
        summary["killed"] = bool(cl.terminate([proc], grace))  # SIGTERM, wait, SIGKILL
        if cl._process(state) is not None:
            raise cl.ClusterError(f"pxtunnel pid {state['pid']} survived SIGKILL; state kept in "
                                  f"{paths['state']}")
    client_file = Path(state.get("client_file") or paths["client_file"])
    if client_file.exists():   # pxtunnel was killed (or had died) before removing it
        summary["removed_file"] = cl._unlink(client_file)
    cl._unlink(paths["state"])
    return summary


def list_tunnels() -> List[dict]:
    rows = []
    for spath in sorted(cl.ipython_dir().glob("profile_*/security/pxtunnel-*.json")):
        state = cl._read_json(spath)
        if not state:
            continue
        rows.append({"name": state.get("name"), "target": state.get("target"),
                     "cluster_id": state.get("cluster_id") or "", "pid": state.get("pid"),
                     "alive": cl._process(state) is not None,
                     "client_file": state.get("client_file"), "state_file": str(spath)})
    return rows


def format_tunnels(rows: List[dict]) -> str:
    lines = ["TUNNEL PROFILE  TARGET  PXTUNNEL PID  LOCAL FILE"]
    for r in rows:
        lines.append(f"{r['name']}  {r['target']}  {r['pid']} "
                     f"({'alive' if r['alive'] else 'dead'})  {r['client_file']}")
    return "\n".join(lines)
