#!/usr/bin/python3
"""Across two hosts: pxfabric vs stock ipyparallel MPI engines over the same 2-host hostfile,
interleaved in one run, paired medians.

Two real "hosts" on this machine (tests/integration/hosts.py: network namespaces nodeA
10.200.0.1 and nodeB 10.200.0.2, each with its own hostname, /etc/hosts and sshd; the
filesystem is shared). Hostfile `nodeA slots=2` / `nodeB slots=2`: ranks 0,1 on nodeA, ranks
2,3 on nodeB. The controller, mpirun and the stock client all run ON nodeA (this script
re-executes itself there with nsenter; the root namespace cannot reach the nodes). Remote
ranks are started by mpirun over ssh (`--mca plm_rsh_agent "ssh -F cfg"`).

Per side, the same argv apart from the program:
  stock  python3 -m ipyparallel.controller --profile-dir=P --ip=10.200.0.1
         mpirun -n 4 --hostfile HF <hosts.mpirun_args()> -x PYTHONPATH -x PXF_PYTHONPATH
                python3 -m ipyparallel.engine --mpi --profile-dir=P --log-level=20
         (the engine command of ipcluster's MPI launcher, `ipcluster start -n 4 --engines=MPI`)
  px     build/bin/pxcontroller --profile-dir=P --ip=10.200.0.1
         mpirun <same> build/bin/pxengine --profile-dir=P --log-level=20
The heartbeat period is each controller's default (3000 ms: what users get; the stock hub
completes a registration only at the engine's first heartbeat). With --ping-variant both
sides run again with --ping=250 (labelled, not the headline).

Metrics (stock 7.1 client on nodeA, blocking calls as ..._async().get(timeout)):
  startup_ready    controller launched -> connection files -> mpirun launched ->
                   Client.wait_for_engines(4) -> rc[:].apply(socket.gethostname) answered  s
  startup_registered  ... up to wait_for_engines(4) returning                               s
  apply_remote     rc[3].apply_sync(lambda: None)  (engine 3 = rank 3, on nodeB: checked)  ms
  execute_all      rc[:].execute('a=1', block=True)  (all 4 ranks, 2 on each host)         ms
  px_magic         %px r = MPI.COMM_WORLD.allreduce(1)  (the real magic through an IPython
                   InteractiveShell, rc.activate(); r == 4 checked)                         ms
  apply_local      rc[1].apply_sync(lambda: None)  (engine 1, on nodeA with the controller;
                   diagnostic)                                                              ms
Latency metrics: median of --calls timed calls per rep after --warmup untimed ones.

Reps: per rep, stock and px back to back (which goes first alternates by rep), each a fresh
cluster; ratios stock/px are paired per rep (> 1: pxfabric faster) and their median quoted.
Diagnostic variants of the px side (--fabric-variants, default on), paired against the same
rep's stock: px with PXF_FABRIC_MAX_SLEEP_US=200 and with PXF_FABRIC_SPIN_US=2000 (exported to
every rank with -x), and px with all 4 ranks on nodeA (px_onehost, hostfile nodeA slots=4);
--variant-calls (default calls/2) timed calls each. Ranks on nodeB cannot be rung by doorbells
(abstract unix sockets are node-local) and poll MPI with a backoff (mpi/fabric.cpp), so these
show what the polling costs. Every call is also split by the client's own timestamps
(request / run / reply / client, see BREAKDOWN). A call slower than --stall-dump s leaves the
thread states of every process in the cluster's dir (kept).

Usage:  /usr/bin/python3 bench/bench_hosts.py [--quick] [--reps 3] [--calls 200]
        [--no-fabric-variants] [--ping-variant] [--json PATH] [--keep]
        /usr/bin/python3 bench/bench_hosts.py --report bench/results/hosts-<UTC>.json
Needs root (network namespaces, sshd); exits 2 with the reason where namespaces cannot be made.
The machine has 2 cores: 4 ranks + controller + client are oversubscribed (Open MPI with
rmaps_base_oversubscribe=1, mpi_yield_when_idle=1).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import redirect_stdout
from pathlib import Path

sys.dont_write_bytecode = True
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import psutil  # noqa: E402

import _harness as H  # noqa: E402
import _report as R  # noqa: E402

REPO = HERE.parent
N_RANKS = 4
SLOTS = {"nodeA": 2, "nodeB": 2}
SLOTS_ONEHOST = {"nodeA": 4}  # the px_onehost diagnostic: every rank next to rank 0
REMOTE_ENGINE = 3   # rank 3: on nodeB
LOCAL_ENGINE = 1    # rank 1: on nodeA, with the controller and the client

# Variants: name -> (side, --ping or None for the default, extra environment for the ranks,
# hostfile layout)
VARIANTS = {
    "stock": ("stock", None, {}, "2x2"),
    "px": ("px", None, {}, "2x2"),
    "px_maxsleep200": ("px", None, {"PXF_FABRIC_MAX_SLEEP_US": "200"}, "2x2"),
    "px_spin2000": ("px", None, {"PXF_FABRIC_SPIN_US": "2000"}, "2x2"),
    "px_onehost": ("px", None, {}, "1x4"),
    "stock_ping250": ("stock", 250, {}, "2x2"),
    "px_ping250": ("px", 250, {}, "2x2"),
}
# (variant, the stock variant it is paired with, label)
PAIRS = [
    ("px", "stock", "headline: default heartbeat (3000 ms), default fabric"),
    ("px_maxsleep200", "stock", "diagnostic: px ranks with PXF_FABRIC_MAX_SLEEP_US=200"),
    ("px_spin2000", "stock", "diagnostic: px ranks with PXF_FABRIC_SPIN_US=2000"),
    ("px_onehost", "stock", "diagnostic: px with all 4 ranks on nodeA (hostfile nodeA slots=4, "
                            "doorbells for every rank) against stock over 2x2"),
    ("px_ping250", "stock_ping250", "variant: both controllers with --ping=250"),
]
# (name, unit, what, goal: minimum paired stock/px at the headline, or None)
METRICS = [
    ("startup_ready", "s", "start-up: controller launch -> 4 registered -> apply to all answered", 3.0),
    ("startup_registered", "s", "  start-up to wait_for_engines(4) returning", None),
    ("apply_remote", "ms/call", f"rc[{REMOTE_ENGINE}].apply_sync(lambda: None), rank on nodeB", 2.0),
    ("execute_all", "ms/call", "rc[:].execute('a=1', block=True), 4 ranks on 2 hosts", 2.0),
    ("px_magic", "ms/call", "%px r = MPI.COMM_WORLD.allreduce(1) (IPython magic)", 2.0),
    ("apply_local", "ms/call", f"rc[{LOCAL_ENGINE}].apply_sync(lambda: None), rank on nodeA (diagnostic)", None),
]
LATENCY = ["apply_remote", "apply_local", "execute_all", "px_magic"]


def mpi_info():
    import os
    import socket as _s

    from mpi4py import MPI

    return MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size, _s.gethostname(), os.getpid()


# Where a call's time goes, from the timestamps the stock client keeps per request (one clock:
# the namespaces share the machine's): submitted (client, request header) -> started (engine,
# reply metadata) -> completed (engine, reply header) -> received (client's I/O thread) ->
# returned (.get() back in our thread). For a request to several engines: the slowest engine's
# started/completed, the last reply's received.
BREAKDOWN = ("request_ms", "run_ms", "reply_ms", "client_ms")


def split_times(ar, returned) -> dict:
    md = ar.metadata
    mds = md if isinstance(md, list) else [md]
    try:
        sub = min(m["submitted"] for m in mds)
        start = max(m["started"] for m in mds)
        done = max(m["completed"] for m in mds)
        recv = max(m["received"] for m in mds)
    except (KeyError, TypeError):
        return {}
    ms = lambda a, b: (b - a).total_seconds() * 1e3  # noqa: E731
    return {"request_ms": ms(sub, start), "run_ms": ms(start, done), "reply_ms": ms(done, recv),
            "client_ms": ms(recv, returned)}


fmt = R.fmt  # one number format for every report


_alive = H.alive


# ============================================================================ inner (on nodeA)

class HostCluster:
    """One controller + one mpirun job over the hostfile, started and stopped by PID, and the
    stock client; runs on nodeA."""

    def __init__(self, variant: str, rep: int, workdir: Path, cfg: dict, shell):
        self.variant, self.rep, self.cfg, self.shell = variant, rep, cfg, shell
        self.side, self.ping, self.extra_env, self.layout = VARIANTS[variant]
        self.wd = workdir
        self.profile = workdir / "profile"
        self.security = self.profile / "security"
        self.controller = None
        self.mpirun = None
        self.ctrl_tree = {}
        self.job_tree = {}
        self.engine_pids = {}
        self.rc = None
        self.call_started = None   # perf_counter() of the call in progress (stall watchdog)
        headline = variant in ("stock", "px", "stock_ping250", "px_ping250")
        self.calls = cfg["calls"] if headline else cfg.get("variant_calls") or cfg["calls"]
        self.out = {"variant": variant, "side": self.side, "rep": rep, "ping_ms": self.ping,
                    "rank_env": self.extra_env, "layout": VARIANTS[variant][3], "calls_per_metric": self.calls, "metrics": {}, "calls": {}, "startup": {}}
        H._ALL_CLUSTERS.append(self)  # the harness watchdog SIGKILLs us by PID if all else fails

    def T(self) -> float:
        return max(5.0, min(self.cfg["call_timeout"], H.remaining_alarm() - 5))

    # ---- processes

    def controller_argv(self):
        prog = [self.cfg["pxcontroller"]] if self.side == "px" else [H.PYTHON, "-m", "ipyparallel.controller"]
        argv = prog + [f"--profile-dir={self.profile}", f"--ip={self.cfg['ip']}"]
        if self.ping:
            argv.append(f"--ping={self.ping}")
        return argv

    def mpirun_argv(self):
        prog = [self.cfg["pxengine"]] if self.side == "px" else list(H.STOCK_MPI_ENGINE)
        xs = ["PYTHONPATH", "PXF_PYTHONPATH"] + sorted(self.extra_env)
        hf = self.cfg["hostfile"] if self.layout == "2x2" else self.cfg["hostfile_onehost"]
        argv = ["mpirun", "-n", str(N_RANKS), "--hostfile", hf] + self.cfg["mpirun_args"]
        for x in xs:
            argv += ["-x", x]
        return argv + prog + [f"--profile-dir={self.profile}", "--log-level=20"]

    def _popen(self, argv, log: Path, env) -> subprocess.Popen:
        with open(log, "ab") as fh:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                    cwd=self.wd, env=env, start_new_session=True)

    def refresh(self):
        for tree, root in ((self.ctrl_tree, self.controller), (self.job_tree, self.mpirun)):
            if root is None:
                continue
            try:
                if root.pid not in tree:
                    tree[root.pid] = psutil.Process(root.pid)
                for k in tree[root.pid].children(recursive=True):
                    tree.setdefault(k.pid, k)
            except psutil.Error:
                pass

    def fail(self, msg):
        tails = "".join(f"\n--- {p.name} tail:\n{H.log_tail(p, 25)}"
                        for p in (self.wd / "controller.log", self.wd / "engines.log"))
        raise H.HarnessError(f"[{self.variant}] {msg}{tails}")

    # ---- start (timed)

    def start(self, deadline: float):
        import ipyparallel as ipp

        env = dict(os.environ)
        env.update(H.MPI_ENV)
        env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
                   IPYTHONDIR=str(self.wd / "ipython"))
        self.profile.mkdir(parents=True)
        self.out["argv"] = {"controller": self.controller_argv(), "mpirun": self.mpirun_argv()}
        t0 = time.perf_counter()
        st = self.out["startup"]
        self.controller = self._popen(self.controller_argv(), self.wd / "controller.log", env)
        cj, ej = self.security / "ipcontroller-client.json", self.security / "ipcontroller-engine.json"
        while True:
            if self.controller.poll() is not None:
                self.fail(f"controller exited with {self.controller.returncode} during start-up")
            try:
                einfo = json.loads(ej.read_text())
                ok = ("registration" in json.loads(cj.read_text()) and "registration" in einfo
                      and (self.side != "px" or "pxf_fabric" in einfo))
            except (OSError, ValueError):
                ok = False
            if ok:
                break
            if time.monotonic() > deadline:
                self.fail("no connection files")
            time.sleep(0.02)
        st["connection_files_s"] = time.perf_counter() - t0
        self.mpirun = self._popen(self.mpirun_argv(), self.wd / "engines.log", {**env, **self.extra_env})
        st["mpirun_launched_s"] = time.perf_counter() - t0
        left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
        self.rc = rc = ipp.Client(str(cj), timeout=left())
        st["client_connected_s"] = time.perf_counter() - t0
        try:
            rc.wait_for_engines(N_RANKS, timeout=left(), interactive=False)
        except Exception as e:  # noqa: BLE001
            why = f"mpirun exited {self.mpirun.returncode}" if self.mpirun.poll() is not None else repr(e)
            self.fail(f"{len(rc.ids)} of {N_RANKS} engines registered ({why})")
        st["registered_s"] = time.perf_counter() - t0
        hostnames = rc[:].apply_async(socket.gethostname).get_dict(timeout=left())
        st["ready_s"] = time.perf_counter() - t0
        self.out["metrics"]["startup_ready"] = st["ready_s"]
        self.out["metrics"]["startup_registered"] = st["registered_s"]
        # where every engine runs
        self.refresh()
        info = rc[:].apply_async(mpi_info).get_dict(timeout=self.T())
        self.out["engines"] = {str(k): {"rank": v[0], "size": v[1], "host": v[2], "pid": v[3]}
                               for k, v in info.items()}
        self.engine_pids = {k: v[3] for k, v in info.items()}
        want_hosts = {i: ("nodeA" if i < SLOTS["nodeA"] or self.layout == "1x4" else "nodeB")
                      for i in range(N_RANKS)}
        if ({k: v[0] for k, v in info.items()} != {i: i for i in range(N_RANKS)}
                or {v[1] for v in info.values()} != {N_RANKS}
                or {k: v[2] for k, v in info.items()} != want_hosts or hostnames != want_hosts):
            self.fail(f"engines are not ranks 0-3 of one job on nodeA,nodeA,nodeB,nodeB: {info}")
        local = {p.pid for p in self.job_tree.values()}
        self.out["engine_pids_local_to_mpirun"] = sorted(p for p in self.engine_pids.values() if p in local)

    # ---- workloads

    def groups(self) -> dict:
        """Our processes by role (CPU accounting; everything else on the machine is "foreign").
        Ranks on nodeB are not our descendants: they are found by the PIDs they reported (one
        PID namespace), with their children (a stock engine's nanny). Not counted: the orted
        and sshd session on nodeB (small)."""
        ranks = []
        for pid in self.engine_pids.values():
            try:
                p = psutil.Process(pid)
                ranks += [p] + p.children(recursive=True)
            except psutil.Error:
                pass
        rank_pids = {p.pid for p in ranks}
        return {"controller": list(self.ctrl_tree.values()), "ranks": ranks,
                "mpirun": [p for p in self.job_tree.values() if p.pid not in rank_pids],
                "client": [psutil.Process(os.getpid())]}

    def timed(self, name, fn):
        H.clear_client_caches(self.rc)
        for _ in range(self.cfg["warmup"]):
            fn()
        H.clear_client_caches(self.rc)
        s0 = H.CpuSnapshot(self.groups())
        ms, parts = [], []
        for _ in range(self.calls):
            t = self.call_started = time.perf_counter()
            ar = fn()
            ms.append((time.perf_counter() - t) * 1e3)
            self.call_started = None
            if ar is not None:
                parts.append(split_times(ar, _dt.datetime.now(_dt.timezone.utc)))
        d = s0.delta(H.CpuSnapshot(self.groups()))
        self.out.setdefault("cpu", {})[name] = {
            k: 100 * d[k] / d["wall"] for k in ("controller", "ranks", "mpirun", "client", "machine", "foreign")}
        self.out["cpu"][name]["wall_s"] = d["wall"]
        self.out["calls"][name] = [round(x, 4) for x in ms]
        s = H.summary(ms)
        s.pop("spread_pct", None)
        s["p10"] = sorted(ms)[int(0.1 * len(ms))]
        self.out.setdefault("call_stats", {})[name] = s
        self.out["metrics"][name] = s["median"]
        if parts:
            self.out.setdefault("breakdown", {})[name] = {
                k: H.median([p[k] for p in parts if p.get(k) is not None]) for k in BREAKDOWN}

    def run(self, names):
        import threading

        stop = threading.Event()
        w = threading.Thread(target=self.stall_watchdog, args=(stop,), daemon=True)
        w.start()
        try:
            self._run(names)
        finally:
            stop.set()
            w.join(timeout=20 if not self.cfg.get("stall_gdb") else 120)

    def stall_watchdog(self, stop) -> None:
        """If one timed call takes longer than --stall-dump s, save what every thread of every
        rank, the controller, mpirun and the client is doing (from /proc, twice, 1 s apart; with
        --stall-gdb also gdb stacks of the ranks and the controller), once per cluster."""
        limit = self.cfg.get("stall_dump") or 0
        while limit > 0 and not stop.wait(0.5):
            t = self.call_started
            if t is None or time.perf_counter() - t < limit:
                continue
            ev = {"after_s": time.perf_counter() - t, "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                  "files": {}}
            pids = {f"engine{k}": (v, self.out["engines"][str(k)]["host"]) for k, v in self.engine_pids.items()}
            if self.controller is not None:
                pids["controller"] = (self.controller.pid, "nodeA")
            if self.mpirun is not None:
                pids["mpirun"] = (self.mpirun.pid, "nodeA")
            pids["client"] = (os.getpid(), "nodeA")
            t_snap = time.perf_counter()
            # 1. what every thread is doing, read from /proc twice 1 s apart (nothing is stopped)
            snap0 = {n: proc_threads(pid) for n, (pid, _) in pids.items()}
            time.sleep(1.0)
            snap1 = {n: proc_threads(pid) for n, (pid, _) in pids.items()}
            f = self.wd / "stall-threads.txt"
            f.write_text(f"window {time.perf_counter() - t_snap:.2f} s (wall), stall noticed after "
                         f"{ev['after_s']:.1f} s (limit {limit} s)\n" + format_threads(pids, snap0, snap1))
            ev["files"]["threads"] = str(f)
            self.out["stall"] = ev
            print(f"  stall: a call of {self.variant} has taken {ev['after_s']:.0f}s; thread states of "
                  f"every rank, the controller and the client in {f}", flush=True)
            if not self.cfg.get("stall_gdb"):
                return
            # 2. gdb stacks, all at once, each in its node's namespaces; a tracee is sent SIGCONT
            # afterwards (gdb killed on its timeout could leave it stopped)
            import threading

            def gdb(name, pid, host):
                out = self.wd / f"stall-{name}-{pid}.txt"
                argv = ["gdb", "-nx", "-p", str(pid), "-batch", "-ex", "set debuginfod enabled off",
                        "-ex", "set pagination off", "-ex", "thread apply all bt 25"]
                holder = self.cfg.get("node_pids", {}).get(host)
                if holder and host != socket.gethostname():
                    argv = ["nsenter", "-t", str(holder), "-n", "-u", "-m", "--"] + argv
                env = {k: v for k, v in os.environ.items() if not k.startswith("DEBUGINFOD")}
                try:
                    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                       timeout=90, env=env)
                    out.write_text(r.stdout + r.stderr)
                    ev["files"][name] = str(out)
                except (OSError, subprocess.TimeoutExpired) as e:
                    ev["files"][name] = f"gdb failed: {e}"
                finally:
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except OSError:
                        pass
            ts = [threading.Thread(target=gdb, args=(n, pid, host)) for n, (pid, host) in pids.items()
                  if n not in ("client", "mpirun")]
            for x in ts:
                x.start()
            for x in ts:
                x.join(timeout=100)
            print(f"  stall: gdb stacks in {self.wd}", flush=True)
            return

    def _run(self, names):
        rc, T = self.rc, self.T
        dv = rc[:]
        dv.execute("from mpi4py import MPI", block=False).get(timeout=T())
        remote, local = rc[REMOTE_ENGINE], rc[LOCAL_ENGINE]

        def got(ar):
            ar.get(timeout=T())
            return ar
        if "apply_remote" in names:
            self.timed("apply_remote", lambda: got(remote.apply_async(lambda: None)))
        if "apply_local" in names:
            self.timed("apply_local", lambda: got(local.apply_async(lambda: None)))
        if "execute_all" in names:
            self.timed("execute_all", lambda: got(dv.execute("a=1", block=False)))
        if "px_magic" in names:
            rc.activate()  # a blocking DirectView on all engines registers %px on the shell
            sink = io.StringIO()
            dv.execute("r = None", block=False).get(timeout=T())

            def magic():
                with redirect_stdout(sink):
                    self.shell.run_line_magic("px", "r = MPI.COMM_WORLD.allreduce(1)")
            self.timed("px_magic", magic)
            r = dv.pull("r", block=False).get(timeout=T())
            if list(r) != [N_RANKS] * N_RANKS:
                raise AssertionError(f"%px allreduce gave {r}; output {sink.getvalue()[-1500:]}")

    # ---- stop, by PID

    def stop(self, grace: float = 10.0) -> dict:
        info = {}
        self.refresh()
        if self.rc is not None:
            try:
                self.rc.close(linger=0)
            except Exception as e:  # noqa: BLE001
                info["client_close_error"] = repr(e)
            self.rc = None
        if self.mpirun is not None and self.mpirun.poll() is None:
            self.mpirun.send_signal(signal.SIGTERM)  # mpirun takes its ranks and remote orteds down
            try:
                self.mpirun.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        targets = [p for p in list(self.job_tree.values()) + list(self.ctrl_tree.values()) if _alive(p)]
        info["needed_sigkill"] = H.stop_procs(targets, grace)
        # Ranks on nodeB are not our descendants: check the PIDs they reported (same PID
        # namespace), only if the process still runs our profile dir.
        left = []
        deadline = time.monotonic() + grace
        for pid in self.engine_pids.values():
            try:
                p = psutil.Process(pid)
                while _alive(p) and time.monotonic() < deadline and str(self.profile) in " ".join(p.cmdline()):
                    time.sleep(0.05)
                if _alive(p) and str(self.profile) in " ".join(p.cmdline()):
                    p.kill()
                    left.append(pid)
            except psutil.Error:
                pass
        info["remote_rank_needed_sigkill"] = left
        for p in (self.mpirun, self.controller):
            if p is not None:
                try:
                    p.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
        info["mpirun_rc"] = self.mpirun.returncode if self.mpirun else None
        info["controller_rc"] = self.controller.returncode if self.controller else None
        if self in H._ALL_CLUSTERS:
            H._ALL_CLUSTERS.remove(self)
        return info

    def kill_all(self):  # harness watchdog
        self.refresh()
        for p in list(self.job_tree.values()) + list(self.ctrl_tree.values()):
            try:
                p.kill()
            except psutil.Error:
                pass
        for pid in self.engine_pids.values():
            try:
                p = psutil.Process(pid)
                if str(self.profile) in " ".join(p.cmdline()):
                    p.kill()
            except psutil.Error:
                pass


def proc_threads(pid: int) -> dict:
    """tid -> (comm, state, wchan, -, utime+stime ticks, scheduling) from /proc."""
    out = {}
    base = Path(f"/proc/{pid}/task")
    try:
        tids = sorted(int(x) for x in os.listdir(base))
    except OSError:
        return out
    for tid in tids:
        d = base / str(tid)
        try:
            stat = (d / "stat").read_text()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            rest = stat[stat.rindex(")") + 2:].split()
            ticks = int(rest[11]) + int(rest[12])
            wchan = (d / "wchan").read_text().strip()
            sysc = []  # not /proc/.../syscall: reading it waits for the thread to be off its CPU
            # priority, nice, policy (0 normal, 1 fifo, 2 rr, 3 batch, 5 idle)
            out[tid] = (comm, rest[0], wchan, " ".join(sysc[:2]), ticks,
                        f"prio {rest[15]} nice {rest[16]} policy {rest[38]}")
        except (OSError, ValueError, IndexError):
            pass
    return out


def format_threads(pids: dict, s0: dict, s1: dict) -> str:
    lines = []
    for name, (pid, host) in pids.items():
        try:
            ag = Path(f"/proc/{pid}/autogroup").read_text().strip()
        except OSError:
            ag = "-"
        lines.append(f"== {name} pid {pid} on {host} ({ag})")
        for tid, (comm, st, wchan, sysc, ticks, sched) in s1.get(name, {}).items():
            before = s0.get(name, {}).get(tid)
            d = ticks - before[4] if before else None
            lines.append(f"  tid {tid:<7} {comm:<16} state {st} wchan {wchan:<32} "
                         f"cpu ticks (1/100 s) over the window: {d}  {sched}")
    return "\n".join(lines) + "\n"


def log_problems(path: Path, limit: int = 8) -> dict:
    # also benign here: every process says so when we stop it (SIGTERM), and pxcontroller on
    # any address but loopback (the same is true of stock: no CurveZMQ)
    return H.log_problems(path, limit, extra_benign=r"[Rr]eceived signal 15|terminating children|"
                                                    r"terminated by signal 15|without encryption: messages are signed")


def run_inner(cfg_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    H.install_time_limit(cfg["timeout"])
    import faulthandler

    # `kill -USR1 <pid>` dumps every Python thread of this process (a stuck client)
    tb_file = open(Path(cfg["tmp"]) / "client-tracebacks.txt", "a")
    faulthandler.register(signal.SIGUSR1, file=tb_file, all_threads=True)
    tmp = Path(cfg["tmp"])
    os.environ["IPYTHONDIR"] = str(tmp / "ipython-client")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [cfg["pxf_pythonpath"]] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ["PXF_PYTHONPATH"] = cfg["pxf_pythonpath"]
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    shell_cfg = Config()
    shell_cfg.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=shell_cfg)

    res = json.loads(Path(cfg["res_path"]).read_text())
    res["client_host"] = socket.gethostname()
    res["machine"]["before"] = H.machine_load()
    print(f"machine load before: {res['machine']['before']}  (client on {socket.gethostname()})", flush=True)
    order_extra = [v for v in ("px_maxsleep200", "px_spin2000", "px_onehost") if cfg["fabric_variants"]]
    only = cfg.get("variants")
    lifecycles, rc_exit = [], 0
    t_run = time.perf_counter()
    try:
        for rep in range(cfg["reps"]):
            seq = ["stock", "px"] if rep % 2 == 0 else ["px", "stock"]
            seq += order_extra
            if cfg["ping_variant"]:
                seq += ["stock_ping250", "px_ping250"] if rep % 2 == 0 else ["px_ping250", "stock_ping250"]
            if only:
                seq = [v for v in (["stock", "px"] if rep % 2 == 0 else ["px", "stock"])
                       + [x for x in VARIANTS if x not in ("stock", "px")] if v in only]
            for v in seq:
                wd = tmp / f"{v}-r{rep}"
                wd.mkdir()
                c = HostCluster(v, rep, wd, cfg, shell)
                t0 = time.perf_counter()
                try:
                    c.start(time.monotonic() + min(120.0, H.remaining_alarm() - 10))
                    c.run(cfg["workloads"])
                except (H.HardTimeout, KeyboardInterrupt):
                    raise
                except Exception as e:  # noqa: BLE001  (one bad cluster does not end the run)
                    c.out["error"] = f"{type(e).__name__}: {e}"[:4000]
                    c.out["traceback"] = traceback.format_exc()[-3000:]
                    c.out["kept_dir"] = str(wd)
                    print(f"ERROR rep {rep + 1} {v}: {c.out['error'][:1500]}", flush=True)
                    rc_exit = 1
                finally:
                    left, ts = signal.alarm(0), time.perf_counter()
                    try:
                        c.out["stop"] = c.stop()
                        c.out["stop"]["stop_s"] = time.perf_counter() - ts
                    finally:
                        if left:
                            signal.alarm(max(1, int(left - (time.perf_counter() - ts))))
                    c.out["controller_log"] = log_problems(wd / "controller.log")
                    c.out["engine_log"] = log_problems(wd / "engines.log")
                    c.out["wall_s"] = time.perf_counter() - t0
                    lifecycles.append(c.out)
                    if not cfg["keep"] and "error" not in c.out and "stall" not in c.out:
                        shutil.rmtree(wd, ignore_errors=True)
                m = c.out["metrics"]
                fr = [x["foreign"] for x in c.out.get("cpu", {}).values()]
                c.out["foreign_pct_of_core_median"] = H.median(fr)
                print(f"rep {rep + 1}/{cfg['reps']} {v:<15} up {fmt(m.get('startup_ready'))}s "
                      f"(registered {fmt(m.get('startup_registered'))}s) | apply nodeB "
                      f"{fmt(m.get('apply_remote'))} nodeA {fmt(m.get('apply_local'))} | execute "
                      f"{fmt(m.get('execute_all'))} | %px {fmt(m.get('px_magic'))} ms | foreign load "
                      f"{fmt(c.out['foreign_pct_of_core_median'], 0)}% | {c.out['wall_s']:.0f}s", flush=True)
    except BaseException as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
        print(f"ERROR: {res['error']}", file=sys.stderr, flush=True)
        rc_exit = 1
    finally:
        signal.alarm(0)
        for c in list(H._ALL_CLUSTERS):
            try:
                c.stop()
            except Exception:  # noqa: BLE001
                pass
    res["run_wall_s"] = time.perf_counter() - t_run
    res["machine"]["after"] = H.machine_load()
    res["lifecycles"] = lifecycles
    res["analysis"] = analyse(lifecycles)
    print_report(res)
    Path(cfg["res_path"]).write_text(json.dumps(res, indent=1, sort_keys=True, default=str) + "\n")
    return rc_exit


# ============================================================================ analysis

def analyse(lifecycles: list) -> dict:
    by = {(lc["variant"], lc["rep"]): lc for lc in lifecycles}
    reps = sorted({lc["rep"] for lc in lifecycles})
    out = {"per_variant": {}, "pairs": {}}
    for v in VARIANTS:
        if not any(k[0] == v for k in by):
            continue
        row = {}
        for name, *_ in METRICS:
            vals = [by[(v, r)]["metrics"][name] for r in reps
                    if (v, r) in by and by[(v, r)]["metrics"].get(name) is not None]
            s = H.summary(vals)
            s["reps"] = vals
            row[name] = s
        out["per_variant"][v] = row
    out["breakdown"] = {}
    for v in out["per_variant"]:
        for name in LATENCY:
            ks = [lc.get("breakdown", {}).get(name) for lc in lifecycles if lc["variant"] == v]
            ks = [k for k in ks if k]
            if ks:
                out["breakdown"].setdefault(v, {})[name] = {
                    k: H.median([x[k] for x in ks if x.get(k) is not None]) for k in BREAKDOWN}
    for pv, sv, label in PAIRS:
        if pv not in out["per_variant"] or sv not in out["per_variant"]:
            continue
        rows = {}
        for name, unit, what, goal in METRICS:
            ratios, per_rep = [], []
            for r in reps:
                s = by.get((sv, r), {}).get("metrics", {}).get(name)
                p = by.get((pv, r), {}).get("metrics", {}).get(name)
                if s is None or p is None or p <= 0:
                    continue
                ratios.append(s / p)
                per_rep.append({"rep": r, "stock": s, "px": p, "ratio": s / p})
            s = H.summary(ratios)
            s["per_rep"] = per_rep
            if pv == "px" and goal is not None and ratios:
                s["goal"] = goal
                s["verdict"] = ("MET" + (" (not in every rep)" if min(ratios) < goal else "")
                                if s["median"] >= goal else
                                "NOT MET" + (" (slower than stock)" if s["median"] < 1 else ""))
            rows[name] = s
        out["pairs"][pv] = {"against": sv, "label": label, "metrics": rows}
    return out


def print_report(res: dict) -> None:
    A = res.get("analysis") or {}
    cfg = res["config"]
    print()
    print(f"pxfabric vs stock ipyparallel MPI engines across two hosts: mpirun -n 4 --hostfile "
          f"(nodeA slots=2, nodeB slots=2) over ssh; controller, mpirun and the stock client on "
          f"nodeA; {cfg['reps']} interleaved reps, {cfg['calls']} calls per latency metric "
          f"(+{cfg['warmup']} warm-up)")
    mb = res["machine"].get("before", {})
    print(f"machine: {mb.get('ncpu')} cores for 4 ranks + controller + client (oversubscribed; "
          f"Open MPI mpi_yield_when_idle=1); load before: busy {mb.get('cpu_busy_pct_1s')}% of all "
          f"cores, loadavg {mb.get('loadavg_1_5_15')}")
    for pv, P in A.get("pairs", {}).items():
        sv = P["against"]
        print()
        print(f"== {pv} vs {sv}  ({P['label']})")
        hdr = (f"{'metric':<20} {'unit':<8} {sv:>14} {'reps min..max':>15} {pv:>15} "
               f"{'reps min..max':>15} {'stock/px':>9} {'paired min..max':>16}  per-rep ratios")
        print(hdr)
        print("-" * len(hdr))
        for name, unit, what, goal in METRICS:
            r = P["metrics"].get(name)
            s = A["per_variant"][sv].get(name, {})
            p = A["per_variant"][pv].get(name, {})
            if not r or not r.get("n"):
                continue
            per = " ".join(f"{x['ratio']:.2f}" for x in r["per_rep"])
            verdict = f"  goal >= {goal:g}x: {r['verdict']}" if "verdict" in r else ""
            print(f"{name:<20} {unit:<8} {fmt(s.get('median')):>14} "
                  f"{fmt(s.get('min')) + '..' + fmt(s.get('max')):>15} {fmt(p.get('median')):>15} "
                  f"{fmt(p.get('min')) + '..' + fmt(p.get('max')):>15} {fmt(r['median']):>8}x "
                  f"{fmt(r['min']) + '..' + fmt(r['max']):>16}  [{per}]{verdict}")
    pv_all = A.get("per_variant", {})
    if pv_all:
        print()
        print("every variant: medians over reps; apply_remote split by the client's timestamps "
              "(request = submitted -> engine started, run, reply = engine completed -> client "
              "received, client = received -> .get() returned), medians over calls and reps, ms")
        hdr = (f"{'variant':<15} {'layout':<6} {'up s':>6} {'apply B':>8} {'apply A':>8} {'execute':>8} "
               f"{'%px':>7} | {'request':>8} {'run':>6} {'reply':>6} {'client':>7} | {'exec req':>8} {'exec reply':>10}")
        print(hdr)
        print("-" * len(hdr))
        for v, row in pv_all.items():
            bd = A.get("breakdown", {}).get(v, {})
            b, e = bd.get("apply_remote", {}), bd.get("execute_all", {})
            print(f"{v:<15} {VARIANTS[v][3]:<6} {fmt(row['startup_ready'].get('median')):>6} "
                  f"{fmt(row['apply_remote'].get('median')):>8} {fmt(row['apply_local'].get('median')):>8} "
                  f"{fmt(row['execute_all'].get('median')):>8} {fmt(row['px_magic'].get('median')):>7} | "
                  f"{fmt(b.get('request_ms')):>8} {fmt(b.get('run_ms')):>6} {fmt(b.get('reply_ms')):>6} "
                  f"{fmt(b.get('client_ms')):>7} | {fmt(e.get('request_ms')):>8} {fmt(e.get('reply_ms')):>10}")
        fr = {v: H.median([lc.get("foreign_pct_of_core_median") for lc in res.get("lifecycles", [])
                           if lc["variant"] == v and lc.get("foreign_pct_of_core_median") is not None])
              for v in pv_all}
        print("other users' load during the latency metrics (machine CPU not ours), % of one core, "
              "median per variant: " + ", ".join(f"{v} {fmt(x, 0)}" for v, x in fr.items()))
    print()
    print("values: median over reps of each rep's value (latency: the rep's median call); "
          "stock/px: median over reps of the paired ratio (rep i vs rep i, run back to back); "
          "> 1 means pxfabric is faster")
    lcs = res.get("lifecycles", [])
    errs = [f"rep {lc['rep'] + 1} {lc['variant']}: {lc['error'][:200]}" for lc in lcs if "error" in lc]
    for e in errs:
        print("error in " + e)
    sk = [(lc["variant"], lc["rep"], lc["stop"]) for lc in lcs
          if lc.get("stop", {}).get("needed_sigkill") or lc.get("stop", {}).get("remote_rank_needed_sigkill")]
    print("stop: " + ("every process exited on SIGTERM" if not sk else f"needed SIGKILL: {sk}"))
    for side in ("stock", "px"):
        n_c = sum(lc.get("controller_log", {}).get("count", 0) for lc in lcs if lc["side"] == side)
        n_e = sum(lc.get("engine_log", {}).get("count", 0) for lc in lcs if lc["side"] == side)
        ex = [l for lc in lcs if lc["side"] == side
              for l in lc.get("controller_log", {}).get("lines", [])[:1] + lc.get("engine_log", {}).get("lines", [])[:1]]
        print(f"{side} logs: {n_c} controller and {n_e} engine-job warning/error lines"
              + (f", e.g. {ex[:2]}" if ex else ""))
    if "run_wall_s" in res:
        print(f"run took {res['run_wall_s'] / 60:.1f} min")


# ============================================================================ outer (root ns)

binfo = H.binary_info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, help="interleaved reps (fresh clusters) per variant (default 3)")
    ap.add_argument("--calls", type=int, help="timed calls per latency metric per rep (default 200)")
    ap.add_argument("--warmup", type=int, help="untimed calls before each latency metric (default 20)")
    ap.add_argument("--variant-calls", type=int,
                    help="timed calls per latency metric for the px diagnostic variants (default calls/2)")
    ap.add_argument("--workloads", default=",".join(LATENCY),
                    help="comma list of latency metrics (default all: " + ",".join(LATENCY) + "); "
                         "start-up is always measured")
    ap.add_argument("--fabric-variants", dest="fabric_variants", action="store_true", default=None,
                    help="run the px diagnostic variants (PXF_FABRIC_MAX_SLEEP_US=200, "
                         "PXF_FABRIC_SPIN_US=2000; default on, off with --quick)")
    ap.add_argument("--no-fabric-variants", dest="fabric_variants", action="store_false")
    ap.add_argument("--ping-variant", action="store_true",
                    help="also run both sides with --ping=250 (start-up with a short heartbeat)")
    ap.add_argument("--variants", default=None,
                    help="run exactly these variants (comma list of " + ",".join(VARIANTS) + "); "
                         "overrides --fabric-variants/--ping-variant")
    ap.add_argument("--stall-dump", type=float, default=10.0,
                    help="if one timed call takes longer than this (s), save gdb stacks of every "
                         "rank and the controller in the cluster's dir, kept (0: off; default 10)")
    ap.add_argument("--stall-gdb", action="store_true",
                    help="on a stall also save gdb stacks (slow on a busy machine: it stops each process)")
    ap.add_argument("--ip", default=None, help="controller --ip (default nodeA's address, 10.200.0.1)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 rep, 20 calls, 5 warm-up, no fabric variants, timeout 180 s")
    ap.add_argument("--call-timeout", type=float, default=60.0, help="limit for any one call, s")
    ap.add_argument("--timeout", type=float, help="hard limit for the whole run, s (default 540, quick 180)")
    ap.add_argument("--px-binary", default=None, help="pxcontroller (default $PXF_CONTROLLER or build/bin)")
    ap.add_argument("--pxengine", default=None, help="pxengine (default $PXF_PXENGINE or build/bin)")
    ap.add_argument("--json", default=None, help="default bench/results/hosts-<UTC>[-quick].json")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (controller/engine logs)")
    ap.add_argument("--report", metavar="JSON", help="run nothing: reprint the tables of a saved run")
    ap.add_argument("--inner", metavar="CFG", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        return run_inner(a.inner)
    if a.report:
        res = json.loads(Path(a.report).read_text())
        res["analysis"] = analyse(res.get("lifecycles", []))
        print_report(res)
        return 0
    defaults = (dict(reps=1, calls=20, warmup=5, timeout=180.0, fabric_variants=False) if a.quick
                else dict(reps=3, calls=200, warmup=20, timeout=540.0, fabric_variants=True))
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    names = [w for w in a.workloads.split(",") if w]
    only = [v for v in (a.variants or "").split(",") if v]
    if [v for v in only if v not in VARIANTS]:
        ap.error(f"unknown variants {[v for v in only if v not in VARIANTS]}")
    bad = [w for w in names if w not in LATENCY]
    if bad:
        ap.error(f"unknown workloads {bad}")

    # hard bound for this process: the inner run gets a.timeout, we allow 90 s more for
    # namespaces, teardown and the inner run's own clean-up
    def on_alarm(signum, frame):
        raise H.HardTimeout(f"hard timeout of {a.timeout + 90:.0f}s exceeded")

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(int(a.timeout + 90))

    px_path = H.px_binary(a.px_binary)
    pxe_path = H.pxengine_binary(a.pxengine)
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    import hosts as hostsmod  # tests/integration/hosts.py
    import ipyparallel
    import mpi4py
    import zmq

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.json) if a.json else HERE / "results" / f"hosts-{stamp}{'-quick' if a.quick else ''}.json"
    tmp = Path(tempfile.mkdtemp(prefix="pxbench-hosts-"))
    # Snapshot what pxfabric runs (a rebuild of build/bin during the run must not mix builds).
    binaries = {"pxcontroller": binfo(px_path), "pxengine": binfo(pxe_path)}
    snap = tmp / "snapshot"
    (snap / "bin").mkdir(parents=True)
    px_copy = str(shutil.copy2(px_path, snap / "bin" / "pxcontroller"))
    pxe_copy = str(shutil.copy2(pxe_path, snap / "bin" / "pxengine"))
    shutil.copytree(REPO / "python" / "pxfabric", snap / "python" / "pxfabric",
                    ignore=shutil.ignore_patterns("__pycache__"))
    binaries["snapshot"] = {"pxcontroller": px_copy, "pxengine": pxe_copy, "python": str(snap / "python")}
    mpiver = subprocess.run(["mpirun", "--version"], capture_output=True, text=True,
                            timeout=20).stdout.splitlines()[:1]
    hosts = None
    proc = None
    rc_exit = 1
    t_all = time.perf_counter()
    try:
        t_h = time.perf_counter()
        try:
            hosts = hostsmod.make_hosts(("nodeA", "nodeB"))
        except hostsmod.HostsUnavailable as e:
            print(f"bench_hosts: cannot make network namespaces here: {e}", file=sys.stderr)
            return 2
        hosts_s = time.perf_counter() - t_h
        hostfile = hosts.write_hostfile(tmp / "hostfile", SLOTS)
        hostfile1 = hosts.write_hostfile(tmp / "hostfile-onehost", SLOTS_ONEHOST)
        ip = a.ip or hosts["nodeA"].ip
        cfg = {"reps": a.reps, "calls": a.calls, "warmup": a.warmup, "workloads": names,
               "fabric_variants": a.fabric_variants, "ping_variant": a.ping_variant,
               "variants": only, "stall_dump": a.stall_dump, "stall_gdb": a.stall_gdb,
               "variant_calls": a.variant_calls or max(1, a.calls // 2),
               "node_pids": {n.name: n.pid for n in hosts.nodes.values()},
               "quick": a.quick, "call_timeout": a.call_timeout, "timeout": a.timeout,
               "keep": a.keep, "ip": ip, "tmp": str(tmp), "hostfile": str(hostfile),
               "hostfile_onehost": str(hostfile1),
               "mpirun_args": hosts.mpirun_args(), "pxcontroller": px_copy, "pxengine": pxe_copy,
               "pxf_pythonpath": str(snap / "python"), "res_path": str(tmp / "result.json")}
        res = {
            "bench": "hosts", "started_utc": stamp, "config": cfg, "binaries": binaries,
            "hosts": {n.name: n.ip for n in hosts.nodes.values()}, "hosts_setup_s": hosts_s,
            "hostfile": hostfile.read_text(), "slots": SLOTS,
            "engines_measured": {"remote": REMOTE_ENGINE, "local": LOCAL_ENGINE},
            "mpi_env": H.MPI_ENV, "variants": {k: list(v) for k, v in VARIANTS.items()},
            "versions": {"python": platform.python_version(), "ipyparallel": ipyparallel.__version__,
                         "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
                         "mpi4py": mpi4py.__version__, "mpi": mpiver[0] if mpiver else ""},
            "machine": {"ncpu": os.cpu_count()},
        }
        (tmp / "cfg.json").write_text(json.dumps(cfg))
        (tmp / "result.json").write_text(json.dumps(res))
        print(f"bench_hosts: reps={a.reps} calls={a.calls} warmup={a.warmup} fabric variants="
              f"{a.fabric_variants} ping-250 variant={a.ping_variant}; hosts up in {hosts_s:.1f}s "
              f"({res['hosts']}); 2x2 ranks, controller --ip={ip}", flush=True)
        print(f"  px: {px_path} (mtime {binaries['pxcontroller']['mtime']}) + {pxe_path} "
              f"(mtime {binaries['pxengine']['mtime']}), run from copies in {snap}", flush=True)
        proc = hosts["nodeA"].popen([H.PYTHON, str(Path(__file__).resolve()), "--inner", str(tmp / "cfg.json")],
                                    env={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"},
                                    stdout=None, stderr=None)
        rc_exit = proc.wait(timeout=a.timeout + 60)
    except BaseException as e:  # noqa: BLE001  (timeouts, ^C, SIGTERM)
        print(f"bench_hosts: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        rc_exit = 1
    finally:
        signal.alarm(0)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the inner run stops its clusters
                proc.wait(timeout=40)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        if hosts is not None:
            hosts.close()
        try:
            res = json.loads((tmp / "result.json").read_text())
        except (OSError, ValueError):
            res = None
        if res is not None:
            res["total_wall_s"] = time.perf_counter() - t_all
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1, sort_keys=True, default=str) + "\n")
            print(f"JSON: {out}  (whole run incl. hosts set-up/teardown {res['total_wall_s'] / 60:.1f} min)")
        if a.keep or rc_exit:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc_exit


if __name__ == "__main__":
    sys.exit(main())
