"""The ``pxcluster`` command line (``scripts/pxcluster``, ``/usr/bin/python3 -m pxfabric``):
the parser and one function per command."""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from pxfabric import __version__, paths
from pxfabric import hostfile as hostmod

from .listing import format_list, list_clusters
from .locations import resolve_profile_dir
from .messages import ClusterError, _say, _selector_args, connect_hint
from .programs import ENGINE_KINDS
from .start import DEFAULT_TIMEOUT, check_hostfile, start_cluster, start_watcher
from .state import load_state
from .stop import _stop_from_state, stop_cluster


def _add_selector(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--profile", metavar="NAME",
                   help="IPython profile: $IPYTHONDIR/profile_NAME (default: default)")
    g.add_argument("--profile-dir", metavar="DIR", help="profile directory (overrides --profile)")


class _VersionAction(argparse.Action):
    """``--version``: the project version and which pxfabric this is (checkout or install
    prefix), on one line (argparse's own version action wraps it at 80 columns)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0,
                         help="print the version and where this pxfabric is, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"pxcluster {__version__} ({paths.describe()})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pxcluster",
        description="Start, stop and list pxfabric clusters: pxcontroller plus one MPI job "
                    "of engines, driven with the stock ipyparallel client.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command",
                                metavar="{start,stop,restart,where,list,check,connect,disconnect}")
    sub.required = True

    _add_start_parser(sub)

    r = sub.add_parser(
        "restart", help="end the engine job and start it again with the same engine ids, "
                        "keeping the controller, its task records and the connected clients",
        description="For a cell that hangs (a rank stuck in a collective): stop the MPI job "
                    "(SIGTERM, SIGKILL after a grace period), wait until the controller has "
                    "unregistered its engines (their outstanding work fails with EngineError), "
                    "and run the same mpirun command again; the new ranks get ids 0..N-1 and "
                    "connected clients keep working. Not for Slurm clusters yet.")
    _add_selector(r)
    r.add_argument("--cluster-id", default="", metavar="ID")
    r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds to wait for the new engines (default {DEFAULT_TIMEOUT:.0f})")

    t = sub.add_parser("stop", help="stop a cluster started by pxcluster start")
    _add_selector(t)
    t.add_argument("--cluster-id", default="", metavar="ID")
    t.add_argument("--all", action="store_true", help="stop every cluster `pxcluster list` shows")

    w = sub.add_parser(
        "where", help="every rank's current state and Python stack (a cell that hangs: which "
                      "rank is stuck where)",
        description="Ask every engine, on the control channel, what it runs and where its main "
                    "thread is; ranks in the same state are shown together. Answered by each "
                    "rank's watch thread, so ranks stuck in MPI answer too; engines that do not "
                    "answer within --timeout are named (stock ipengines never answer).")
    _add_selector(w)
    w.add_argument("--cluster-id", default="", metavar="ID")
    w.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for the answers (default 5)")
    w.add_argument("--json", action="store_true", help="machine-readable output")

    ls = sub.add_parser("list", help="show clusters started by pxcluster")
    _add_selector(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    _add_check_parser(sub)
    _add_tunnel_parsers(sub)
    return parser


def _add_start_parser(sub) -> None:
    """``start``: the options of a local/hostfile start and of a Slurm one."""
    s = sub.add_parser("start", help="start a controller and one MPI job of N engines")
    s.add_argument("-n", "--n", type=int, required=True, metavar="N", help="number of MPI ranks")
    _add_selector(s)
    s.add_argument("--cluster-id", default="", metavar="ID",
                   help="cluster id: files ipcontroller-ID-{client,engine}.json")
    s.add_argument("--engines", choices=ENGINE_KINDS, default="pxengine",
                   help="pxengine (build/bin/pxengine, default) or ipengine (stock "
                        "`python3 -m ipyparallel.engine --mpi` on every rank)")
    s.add_argument("--engine-cmd", metavar="CMD", default=None,
                   help="run CMD on every rank instead (profile arguments are appended)")
    s.add_argument("--hostfile", metavar="FILE", help="mpirun --hostfile FILE")
    s.add_argument("--mpi-args", default="", metavar="ARGS",
                   help='extra mpirun arguments, e.g. "--bind-to none"')
    s.add_argument("--mpirun", default=None, metavar="CMD",
                   help="MPI launcher (default $PXF_MPIRUN or mpirun)")
    s.add_argument("--controller-args", default="", metavar="ARGS",
                   help='extra pxcontroller arguments, e.g. "--ping 1000 --log-level 10"')
    s.add_argument("--engine-args", default="", metavar="ARGS",
                   help="extra arguments for every rank's engine")
    s.add_argument("--restart-hung", type=float, default=None, metavar="SECONDS",
                   help="restart the engine job by itself (same ids, controller and clients "
                        "kept) when a rank stays stuck SECONDS after an interrupt")
    s.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds to wait for all engines (default {DEFAULT_TIMEOUT:.0f})")

    b = s.add_argument_group(
        "Slurm", "--slurm submits the whole cluster as one batch job (slurm/pxfabric.sbatch: "
        "the controller on the job's first node, the engines over the allocation)")
    b.add_argument("--slurm", action="store_true", help="run the cluster as a Slurm batch job")
    b.add_argument("--nodes", "-N", metavar="N", help="sbatch --nodes")
    b.add_argument("--time", "-t", dest="timelimit", metavar="TIME",
                   help="sbatch --time (walltime: MINUTES, HH:MM:SS, D-HH:MM ...)")
    b.add_argument("--partition", "-p", metavar="NAME", help="sbatch --partition")
    b.add_argument("--account", "-A", metavar="NAME", help="sbatch --account")
    b.add_argument("--qos", metavar="NAME", help="sbatch --qos")
    b.add_argument("--slurm-args", default="", metavar="ARGS",
                   help='more sbatch options, e.g. "--constraint=cpu --exclusive"')
    b.add_argument("--slurm-template", metavar="FILE",
                   help="batch script template ({n} {queue} {account} {timelimit} {nodes} "
                        "... as ipyparallel's Slurm launcher; default "
                        "slurm/pxcluster.sbatch.template)")
    b.add_argument("--slurm-launch", choices=("srun", "mpirun"), default=None,
                   help="how the job starts its ranks (default: srun --mpi=pmix when the "
                        "site's srun offers it, else mpirun)")


def _add_check_parser(sub) -> None:
    """``check``: the pre-flight check of a hostfile's hosts."""
    c = sub.add_parser(
        "check", help="pre-flight check of a hostfile's hosts (ssh, pxengine, Python, the "
                      "controller's address)",
        description="Log in to every host of the hostfile with the agent mpirun will use "
                    "(BatchMode, 5 s connect timeout), run `pxengine --version` and the Python "
                    "imports there, and connect back to the address the controller would "
                    "listen on. One line per host; exit status 0 only if every host is OK.")
    c.add_argument("--hostfile", required=True, metavar="FILE", help="Open MPI hostfile")
    c.add_argument("--mpi-args", default="", metavar="ARGS",
                   help="the mpirun arguments of the start (for --mca plm_rsh_agent, --prefix)")
    c.add_argument("--controller-args", default="", metavar="ARGS",
                   help="the controller arguments of the start (--ip/--engine-ip), "
                        "e.g. --controller-args=--engine-ip=10.0.0.1")
    c.add_argument("--engines", choices=ENGINE_KINDS, default="pxengine",
                   help="what the ranks run (ipengine: no pxengine step)")
    _add_selector(c)
    c.add_argument("--timeout", type=float, default=hostmod.DEFAULT_CHECK_TIMEOUT, metavar="S",
                   help=f"seconds per host (default {hostmod.DEFAULT_CHECK_TIMEOUT:.0f}); hosts "
                        "are checked in parallel")


def _add_tunnel_parsers(sub) -> None:
    """``connect``/``disconnect`` (python/pxfabric/connect.py: pxtunnel, one SSH session)."""
    k = sub.add_parser("connect", help="forward a remote controller's ports through one SSH "
                                       "session (pxtunnel) and write a local profile for them")
    k.add_argument("target", metavar="[user@]host")
    k.add_argument("--remote-profile-dir", metavar="DIR",
                   help="the controller's profile dir on the host (default "
                        "~/.ipython/profile_default)")
    k.add_argument("--remote-file", metavar="PATH", help="the client connection file on the host")
    k.add_argument("--cluster-id", default="", metavar="ID")
    k.add_argument("--jump", "-J", metavar="HOST", help="jump host (as ssh -J / ProxyJump)")
    k.add_argument("--as", dest="name", metavar="NAME",
                   help="local profile name (default: the host)")
    k.add_argument("-F", dest="ssh_config", metavar="CONFIG", help="ssh config file")
    k.add_argument("-i", dest="identity", metavar="KEY", help="identity (private key) file")
    k.add_argument("-p", dest="port", type=int, default=0, metavar="PORT", help="ssh port")
    k.add_argument("--known-hosts", metavar="FILE", help="known_hosts file to check/record in")
    k.add_argument("--accept-new-host-key", action="store_true",
                   help="record an unknown host key (a changed one is always refused)")
    k.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for the tunnel (default 30)")
    d = sub.add_parser("disconnect", help="stop the tunnel of `pxcluster connect`")
    d.add_argument("name", metavar="NAME", help="the local profile name (host or --as NAME)")
    d.add_argument("--cluster-id", default="", metavar="ID")


def _tunnel_main(args) -> int:
    from pxfabric import connect as tunnel
    if args.command == "connect":
        state = tunnel.connect(
            args.target, name=args.name, remote_profile_dir=args.remote_profile_dir,
            remote_file=args.remote_file, cluster_id=args.cluster_id, jump=args.jump,
            ssh_config=args.ssh_config, identity=args.identity, port=args.port,
            accept_new_host_key=args.accept_new_host_key, known_hosts=args.known_hosts,
            timeout=args.timeout)
        print(f"Connect with: {tunnel.connect_hint(state)}")
        print(f"Stop with: pxcluster disconnect {shlex.quote(state['name'])}"
              + (f" --cluster-id {shlex.quote(state['cluster_id'])}" if state['cluster_id']
                 else ""), flush=True)
        return 0
    summary = tunnel.disconnect(args.name, args.cluster_id)
    how = ("not running" if not summary["was_running"] else
           "killed (SIGKILL)" if summary["killed"] else "stopped")
    _say(f"tunnel '{args.name}' (pxtunnel pid {summary['pid']}) {how}"
         + ("; removed its stale local connection file" if summary["removed_file"] else ""))
    return 0


# Options whose value is a command line of its own: `--mpi-args "--bind-to none"` must not be
# read as an option (argparse refuses a value that starts with "-" unless written OPT=VALUE).
_COMMAND_LINE_OPTIONS = ("--mpi-args", "--controller-args", "--engine-args", "--slurm-args",
                         "--mpirun", "--engine-cmd")


def _glue_command_line_options(argv: Sequence[str]) -> List[str]:
    out: List[str] = []
    it = iter(argv)
    for a in it:
        if a in _COMMAND_LINE_OPTIONS:
            value = next(it, None)
            out.append(a if value is None else f"{a}={value}")
        else:
            out.append(a)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(_glue_command_line_options(argv))
    commands = {"connect": _tunnel_main, "disconnect": _tunnel_main, "start": _start_main,
                "stop": _stop_main, "restart": _restart_main, "check": _check_main,
                "where": _where_main, "list": _list_main}
    try:
        if args.command in commands:
            return commands[args.command](args)
    except ClusterError as e:
        _say(f"error: {e}", stream=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _say("interrupted", stream=sys.stderr)
        return 130
    return 2


def _start_main(args) -> int:
    if args.slurm:
        return _start_slurm_main(args)
    if any(getattr(args, k) for k in ("nodes", "timelimit", "partition", "account",
                                       "qos", "slurm_args", "slurm_template",
                                       "slurm_launch")):
        raise ClusterError("--nodes, --time, --partition, --account, --qos and the "
                           "--slurm-* options need --slurm")
    if args.restart_hung is not None and args.restart_hung <= 0:
        raise ClusterError(f"--restart-hung must be a positive number of seconds "
                           f"(got {args.restart_hung:g})")
    state = start_cluster(
        args.n, profile=args.profile, profile_dir=args.profile_dir,
        cluster_id=args.cluster_id, engines=args.engines, engine_cmd=args.engine_cmd,
        hostfile=args.hostfile, mpi_args=shlex.split(args.mpi_args), mpirun=args.mpirun,
        controller_args=shlex.split(args.controller_args),
        engine_args=shlex.split(args.engine_args), timeout=args.timeout)
    _say(f"{state['n']} engines ({state['engine_kind']}) registered in "
         f"{state['ready_seconds']:.1f}s; profile dir {state['profile_dir']}, "
         f"cluster id {state['cluster_id'] or '(none)'}")
    _say(f"logs in {Path(state['profile_dir']) / 'log'}; state {state['state_file']}")
    if args.restart_hung:
        start_watcher(state, args.restart_hung)
    print("Connect with:\n" + connect_hint(state))
    print(f"Stop with:\n    pxcluster stop {_selector_args(state)}", flush=True)
    return 0


def _start_slurm_main(args) -> int:
    from pxfabric import slurm
    if args.restart_hung is not None and args.restart_hung <= 0:
        raise ClusterError(f"--restart-hung must be a positive number of seconds "
                           f"(got {args.restart_hung:g})")
    if args.hostfile or args.engines != "pxengine" or args.engine_cmd or args.mpirun:
        raise ClusterError("--slurm runs pxengine over the job's allocation: "
                           "--hostfile, --engines, --engine-cmd and --mpirun do not "
                           "apply (use --slurm-launch, --mpi-args, --slurm-args)")
    state = slurm.start_slurm_cluster(
        args.n, profile=args.profile, profile_dir=args.profile_dir,
        cluster_id=args.cluster_id, nodes=args.nodes, timelimit=args.timelimit,
        queue=args.partition, account=args.account, qos=args.qos,
        slurm_args=shlex.split(args.slurm_args), template=args.slurm_template,
        launch=args.slurm_launch, controller_args=shlex.split(args.controller_args),
        engine_args=shlex.split(args.engine_args), mpi_args=shlex.split(args.mpi_args),
        timeout=args.timeout)
    if args.restart_hung:
        start_watcher(state, args.restart_hung)  # here: it restarts through the batch job
    print("Connect with:\n" + connect_hint(state))
    cid = f" --cluster-id {shlex.quote(state['cluster_id'])}" if state["cluster_id"] else ""
    print(f"From a laptop:\n    pxcluster connect {socket.getfqdn()} --remote-profile-dir "
          f"{shlex.quote(state['profile_dir'])}{cid}")
    print(f"Stop with:\n    pxcluster stop {_selector_args(state)}   "
          f"(scancel {state['slurm']['job_id']})", flush=True)
    return 0


def _stop_main(args) -> int:
    if args.all:
        rows = list_clusters([resolve_profile_dir(args.profile, args.profile_dir,
                                                  create=False)]
                             if (args.profile or args.profile_dir) else [])
        if not rows:
            _say("no clusters to stop")
        failed = 0
        for r in rows:
            state = load_state(Path(r["state_file"]))
            if state is None:
                continue
            _say(f"stopping {r['profile_dir']} (cluster id {r['cluster_id'] or '(none)'})")
            if _stop_from_state(state)["left"]:
                failed += 1
        return 1 if failed else 0
    summary = stop_cluster(args.profile, args.profile_dir, args.cluster_id)
    _say("stopped; no process left" + (
        f"; removed {', '.join(summary['removed'])}" if summary["removed"] else ""))
    return 0


def _restart_main(args) -> int:
    from pxfabric.restart import restart_cluster
    restart_cluster(args.profile, args.profile_dir, args.cluster_id, timeout=args.timeout)
    return 0


def _check_main(args) -> int:
    try:
        checks = check_hostfile(
            args.hostfile, mpi_args=shlex.split(args.mpi_args),
            controller_args=shlex.split(args.controller_args), engines=args.engines,
            profile=args.profile, profile_dir=args.profile_dir, timeout=args.timeout)
    except hostmod.HostfileError as e:
        raise ClusterError(str(e)) from None
    for chk in checks:
        print(chk.line(), flush=True)
    bad = [chk.host for chk in checks if not chk.ok]
    if bad:
        _say(f"{len(bad)} of {len(checks)} hosts not ready: {', '.join(bad)}",
             stream=sys.stderr)
        return 1
    _say(f"all {len(checks)} hosts ready")
    return 0


def _where_main(args) -> int:
    from pxfabric import where as wheremod
    states = wheremod.where(args.profile, args.profile_dir, args.cluster_id,
                            timeout=args.timeout)
    print(json.dumps({str(k): v for k, v in sorted(states.items())}, indent=2)
          if args.json else wheremod.format_states(states), flush=True)
    return 0


def _list_main(args) -> int:
    dirs = []
    if args.profile or args.profile_dir:
        dirs.append(resolve_profile_dir(args.profile, args.profile_dir, create=False))
    rows = list_clusters(dirs)
    if dirs:
        rows = [r for r in rows if Path(r["profile_dir"]) == dirs[0]]
    print(json.dumps(rows, indent=2) if args.json else format_list(rows))
    if not args.json:
        from pxfabric import connect as tunnel
        trows = tunnel.list_tunnels()
        if trows:
            print(tunnel.format_tunnels(trows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
