#!/usr/bin/python3
"""MPI engines: pxfabric (pxcontroller + mpiexec -n N pxengine) vs stock ipyparallel MPI
engines (stock ipcontroller + mpiexec -n N python3 -m ipyparallel.engine --mpi), same
stock-client workloads, at several N, interleaved rep by rep.

One cluster runs at a time. A "rep" at one N is: start the cluster (timed: start-up), warm
up, run every workload, measure idle CPU, stop it; the other kind follows right after (which
kind goes first alternates by rep and by N), so each rep of px is paired with the rep of stock
run back to back. Ratios are computed per pair and their median is what we quote.

Both controllers get the same argv: --profile-dir=<tmp> --ip=127.0.0.1 --ping=250. Both
engine jobs are started the same way, `mpiexec -n N <program> --profile-dir=<tmp>
--log-level=20` with the Open MPI variables OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1,
OMPI_MCA_rmaps_base_oversubscribe=1 and OMPI_MCA_mpi_yield_when_idle=1; <program> is
build/bin/pxengine or `/usr/bin/python3 -m ipyparallel.engine --mpi` (the command ipcluster's
MPIEngineSetLauncher runs; it also passes --log-level=20).

Workloads (stock ipyparallel.Client calls; dv = rc[:], after `from mpi4py import MPI` once):
  px_allreduce    dv.execute("r = MPI.COMM_WORLD.allreduce(1)", block=True)        ms/call
  px_execute      dv.execute("a=1", block=True)                                    ms/call
  px_magic        %px r = MPI.COMM_WORLD.allreduce(1)   (dv.activate(); InteractiveShell
                  .run_line_magic('px', ...): the real magic, which also waits for output)
  broadcast       rc.broadcast_view().apply_sync(lambda: 1)                         ms/call
  push            dv.push({"x": <8 MB float64 array>}, block=True)                  ms/push
  scatter_gather  dv.scatter("a", np.arange(10_000_000)); dv.gather("a", block=True) ms
                  (push and scatter send different data each call: arange + call number)
  lb_map          lview.map_async(f, range(2000)).get()                             tasks/s
  startup         controller launched -> N engines registered -> first apply to all  s
  idle            after ~5 s idle, CPU % of one core per engine rank (and of the
                  controller, mpiexec) over ~5 s, psutil cpu_times

With --against-px PATH and/or --against-pxengine PATH the stock side is a second pxfabric
instead (an older pxcontroller and pxengine; the one not given is the new one): new and old
are measured the same way, paired rep by rep, reported as "new" and "old", and every goal
becomes "not worse" (before/after benchmarks of a change to pxfabric). The old pxengine
imports python/pxfabric from --against-pythonpath (default: the same snapshot as the new one).

Usage:  /usr/bin/python3 bench/bench_engines.py [--quick] [--reps 3] [--ns 2,4,8]
        [--workloads ...] [--json PATH] [--keep]
        [--against-px OLD_PXCONTROLLER] [--against-pxengine OLD_PXENGINE]
        [--against-pythonpath DIR]
The machine has 2 cores: N=4 is 2x and N=8 4x oversubscribed (rank counts honest).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import shutil
import signal as _signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import redirect_stdout
from pathlib import Path
from typing import Optional

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import psutil  # noqa: E402

import _harness as H  # noqa: E402
import _report as R  # noqa: E402

HERE = Path(__file__).resolve().parent
LABEL = {"px": "pxfabric", "stock": "stock"}


def f(x=None):
    return x


def pxfabric_file():
    import pxfabric

    return pxfabric.__file__


def mpi_rank_size():
    from mpi4py import MPI

    return MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size


# Workloads that can be selected (--workloads); startup is always measured.
WORKLOAD_NAMES = ["px_allreduce", "px_execute", "px_magic", "broadcast", "push",
                  "scatter_gather", "lb_map", "idle"]

# Metrics: (name, workload, better, unit, what, goal)
#   better: "lower" (ratio stock/px) or "higher" (ratio px/stock); ratio > 1: pxfabric better
#   goal:  minimum paired ratio at the largest N (the goals at N=8), or 1.0 for
#          "nothing worse", or None (information only)
METRICS = [
    ("px_allreduce", "px_allreduce", "lower", "ms/call",
     'rc[:].execute("r = MPI.COMM_WORLD.allreduce(1)", block=True)', 3.0),
    ("px_execute", "px_execute", "lower", "ms/call", "rc[:].execute('a=1', block=True)", 3.0),
    ("px_magic", "px_magic", "lower", "ms/call",
     "%px r = MPI.COMM_WORLD.allreduce(1)  (IPython magic)", 3.0),
    ("broadcast", "broadcast", "lower", "ms/call", "rc.broadcast_view().apply_sync(lambda: 1)", 3.0),
    ("push", "push", "lower", "ms/push", 'rc[:].push({"x": 8 MB float64}, block=True)', 2.0),
    ("scatter_gather", "scatter_gather", "lower", "ms",
     'dv.scatter("a", np.arange(10_000_000)) + dv.gather("a", block=True)', 2.0),
    ("scatter", "scatter_gather", "lower", "ms", "  the scatter part", None),
    ("gather", "scatter_gather", "lower", "ms", "  the gather part", None),
    ("lb_map", "lb_map", "higher", "tasks/s", "lview.map_async(f, range(2000)).get()", 1.0),
    ("startup_ready", "startup", "lower", "s",
     "start-up: controller launch -> N registered -> apply answered", 3.0),
    ("startup_registered", "startup", "lower", "s", "  start-up to len(rc.ids) == N", None),
    ("idle_rank_cpu", "idle", "lower", "%core/rank",
     "idle CPU per engine rank (median rank, incl. stock nanny)", 1.0),
    ("idle_rank_cpu_max", "idle", "lower", "%core", "  idle CPU of the busiest rank", None),
    ("idle_mpiexec_cpu", "idle", "lower", "%core", "  idle CPU of mpiexec", None),
    ("idle_controller_cpu", "idle", "lower", "%core", "idle CPU of the controller (whole tree)", 1.0),
]
METRIC = {m[0]: m for m in METRICS}
# (goals, parity and the idle-CPU tick rule: bench/_report.py)


class Timeout:
    def __init__(self, per_call: float):
        self.per_call = per_call

    def __call__(self) -> float:
        return max(5.0, min(self.per_call, H.remaining_alarm() - 5))


class Lifecycle:
    """One cluster of one kind at one N: start (timed), workloads, idle CPU, stop."""

    def __init__(self, kind: str, n: int, rep: int, workdir: Path, cfg: argparse.Namespace,
                 px_path: str, pxengine_path: str, shell, old: Optional[dict] = None,
                 label: Optional[str] = None):
        """``old`` (--against-px/--against-pxengine): the stock side runs this older pxfabric
        instead, {"pxcontroller", "pxengine", "pythonpath" (its PXF_PYTHONPATH)}."""
        self.kind, self.n, self.rep, self.cfg = kind, n, rep, cfg
        old_px = kind == "stock" and old is not None
        if old_px:
            px_path, program = old["pxcontroller"], [old["pxengine"]]
        else:
            program = [pxengine_path] if kind == "px" else list(H.STOCK_MPI_ENGINE)
        self.c = H.Cluster("px" if old_px else kind, workdir, n, px_path, engine_mode="mpi",
                           engine_program=program, engine_args=["--log-level=20"], label=label)
        if old_px and old.get("pythonpath"):
            self.c.env["PXF_PYTHONPATH"] = old["pythonpath"]  # what the old pxengine imports
        self.shell = shell
        self.T = Timeout(cfg.call_timeout)
        self.out: dict = {"kind": kind, "n": n, "rep": rep, "metrics": {}, "calls": {}, "cpu": {}}

    # ---- helpers

    def groups(self):
        return {"controller": self.c.controller_procs(), "engines": self.c.engine_procs(),
                "client": [psutil.Process(os.getpid())]}

    def clean(self) -> None:
        H.clear_client_caches(self.rc)  # same on both kinds

    def timed_calls(self, name: str, calls: int, fn) -> list:
        self.clean()
        g = self.groups()
        s0 = H.CpuSnapshot(g)
        ms = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t) * 1e3)
        self.out["cpu"][name] = s0.delta(H.CpuSnapshot(g))
        self.out["calls"][name] = ms
        return ms

    # ---- start

    def start(self, deadline: float) -> None:
        c = self.c
        c.start_controller(deadline)
        c.start_engines()
        c.connect(deadline)
        self.rc = c.client
        self.out["startup"] = dict(c.timings)
        self.out["metrics"]["startup_ready"] = c.timings["ready_s"]
        self.out["metrics"]["startup_registered"] = c.timings["all_engines_registered_s"]
        self.dv = self.rc[:]
        self.bv = self.rc.broadcast_view()
        self.lv = self.rc.load_balanced_view()
        T = self.T()
        self.dv.execute("from mpi4py import MPI", block=False).get(timeout=T)
        rs = self.dv.apply_async(mpi_rank_size).get_dict(timeout=T)
        self.out["engine_id_to_rank"] = {str(k): v[0] for k, v in rs.items()}
        self.out["ids_equal_ranks"] = all(k == v[0] for k, v in rs.items())
        sizes = {v[1] for v in rs.values()}
        if sizes != {self.n} or sorted(v[0] for v in rs.values()) != list(range(self.n)):
            raise AssertionError(f"engines are not the {self.n} ranks of one job: {rs}")
        if self.c.kind == "px":  # which python/pxfabric the ranks run (the run's snapshot)
            self.out["pxfabric_module"] = self.rc[0].apply_async(pxfabric_file).get(timeout=T)
        self.out["processes"] = {"controller": len(c.controller_procs()),
                                 "engine_job": len(c.engine_procs())}

    # ---- workloads

    def run(self, names) -> None:
        cfg, n, T = self.cfg, self.n, self.T
        import numpy as np

        if "px_allreduce" in names:
            def allreduce():
                self.dv.execute("r = MPI.COMM_WORLD.allreduce(1)", block=False).get(timeout=T())
            for _ in range(cfg.warmup):
                allreduce()
            ms = self.timed_calls("px_allreduce", cfg.calls, allreduce)
            got = self.dv.pull("r", block=False).get(timeout=T())
            assert list(got) == [n] * n, got
            self.out["metrics"]["px_allreduce"] = H.median(ms)

        if "px_execute" in names:
            def execute():
                self.dv.execute("a=1", block=False).get(timeout=T())
            for _ in range(cfg.warmup):
                execute()
            self.out["metrics"]["px_execute"] = H.median(self.timed_calls("px_execute", cfg.calls, execute))

        if "px_magic" in names:
            # rc.activate() = a DirectView on all engines with block=True, then view.activate():
            # registers %px etc. on the InteractiveShell (what a user does in IPython)
            self.rc.activate()
            sink = io.StringIO()

            def magic():
                with redirect_stdout(sink):
                    self.shell.run_line_magic("px", "r = MPI.COMM_WORLD.allreduce(1)")
            self.dv.execute("r = None", block=False).get(timeout=T())
            for _ in range(cfg.warmup):
                magic()
            ms = self.timed_calls("px_magic", cfg.calls, magic)
            got = self.dv.pull("r", block=False).get(timeout=T())
            assert list(got) == [n] * n, (got, sink.getvalue()[-2000:])
            self.out["magic_output_chars"] = len(sink.getvalue())
            self.out["metrics"]["px_magic"] = H.median(ms)

        if "broadcast" in names:
            def bcast():
                r = self.bv.apply_async(lambda: 1).get(timeout=T())
                assert list(r) == [1] * n, r
            for _ in range(cfg.warmup):
                bcast()
            self.out["metrics"]["broadcast"] = H.median(self.timed_calls("broadcast", cfg.calls, bcast))

        if "push" in names:
            x = np.arange(cfg.push_mb * 1024 * 1024 // 8, dtype=np.float64)
            # A different array for every push (made before timing): pxcontroller keeps an
            # identical record buffer once, and the same array pushed again would be a repeat.
            fresh = iter([x + i for i in range(max(1, cfg.warmup) + cfg.pushes)])

            def push():
                self.dv.push({"x": next(fresh)}, block=False).get(timeout=T())
            for _ in range(max(1, cfg.warmup)):
                push()  # warm-up (the first pushes into fresh engines are slower on both)
            ms = self.timed_calls("push", cfg.pushes, push)
            got = self.dv.pull("x.nbytes", block=False).get(timeout=T())
            assert list(got) == [x.nbytes] * n, got
            self.dv.execute("del x", block=False).get(timeout=T())
            self.out["push_bytes"] = int(x.nbytes)
            self.out["metrics"]["push"] = H.median(ms)

        if "scatter_gather" in names:
            arr = np.arange(cfg.scatter_n)
            arrs = [arr + i for i in range(cfg.scatters)]  # different data every time, as for push
            small = np.arange(max(n, cfg.scatter_n // 10))
            self.dv.scatter("a", small, block=False).get(timeout=T())  # warm-up
            self.dv.gather("a", block=False).get(timeout=T())
            self.clean()
            g = self.groups()
            s0 = H.CpuSnapshot(g)
            sc, ga = [], []
            for arr in arrs:
                t = time.perf_counter()
                self.dv.scatter("a", arr, block=False).get(timeout=T())
                t1 = time.perf_counter()
                back = self.dv.gather("a", block=False).get(timeout=T())
                t2 = time.perf_counter()
                sc.append((t1 - t) * 1e3)
                ga.append((t2 - t1) * 1e3)
                if not (isinstance(back, np.ndarray) and np.array_equal(back, arr)):
                    raise AssertionError(f"gather returned {type(back).__name__} "
                                         f"len {len(back)} != the scattered array")
                del back
                self.clean()
            self.out["cpu"]["scatter_gather"] = s0.delta(H.CpuSnapshot(g))
            self.out["calls"]["scatter"], self.out["calls"]["gather"] = sc, ga
            self.dv.execute("del a", block=False).get(timeout=T())
            self.out["scatter_bytes"] = int(arr.nbytes)
            tot = [a + b for a, b in zip(sc, ga)]
            self.out["calls"]["scatter_gather"] = tot
            self.out["metrics"].update(scatter_gather=H.median(tot), scatter=H.median(sc),
                                       gather=H.median(ga))

        if "lb_map" in names:
            self.lv.map_async(f, range(max(20, cfg.tasks // 10))).get(timeout=T())  # warm-up
            self.clean()
            g = self.groups()
            s0 = H.CpuSnapshot(g)
            t = time.perf_counter()
            res = self.lv.map_async(f, range(cfg.tasks)).get(timeout=T())
            wall = time.perf_counter() - t
            self.out["cpu"]["lb_map"] = s0.delta(H.CpuSnapshot(g))
            if list(res) != list(range(cfg.tasks)):
                raise AssertionError("lb_map: wrong results")
            self.out["lb_map_wall_s"] = wall
            self.out["metrics"]["lb_map"] = cfg.tasks / wall

        if "idle" in names:
            self.idle()

    def idle(self) -> None:
        cfg, c = self.cfg, self.c
        self.clean()
        time.sleep(cfg.idle_wait)
        c.refresh()
        ranks = {eid: c.rank_tree(pid) for eid, pid in c.engine_pid.items()}
        rank_pids = {p.pid for ps in ranks.values() for p in ps}
        launcher = [p for p in c.engine_procs() if p.pid not in rank_pids]
        groups = {f"rank{eid}": ps for eid, ps in ranks.items()}
        groups.update(controller=c.controller_procs(), mpiexec=launcher,
                      client=[psutil.Process(os.getpid())])
        s0 = H.CpuSnapshot(groups)
        time.sleep(cfg.idle_measure)
        d = s0.delta(H.CpuSnapshot(groups))
        pct = lambda k: 100.0 * d[k] / d["wall"]  # noqa: E731
        per_rank = [pct(f"rank{eid}") for eid in ranks]
        self.out["idle"] = {"window_s": d["wall"], "after_idle_s": cfg.idle_wait,
                            "per_rank_pct": per_rank, "controller_pct": pct("controller"),
                            "mpiexec_pct": pct("mpiexec"), "client_pct": pct("client"),
                            "foreign_pct": pct("foreign"),
                            "controller_processes": len(groups["controller"]),
                            "mpiexec_processes": len(launcher)}
        self.out["metrics"].update(idle_rank_cpu=H.median(per_rank), idle_rank_cpu_max=max(per_rank),
                                   idle_mpiexec_cpu=pct("mpiexec"),
                                   idle_controller_cpu=pct("controller"))

    def stop(self) -> None:
        try:
            self.out["controller_log"] = self.c.controller_log_problems(limit=10)
            self.out["engine_log"] = engine_log_problems(self.c.workdir / "engines.log")
        except Exception:  # noqa: BLE001
            pass
        self.out["stop"] = H.stop_clusters([self.c])[0]


def engine_log_problems(path: Path, limit: int = 10) -> dict:
    return H.log_problems(path, limit)


# ----------------------------------------------------------------------------- analysis

fmt = R.fmt  # one number format for every report
# Timed workloads whose CPU per call is recorded by process group (Lifecycle.timed_calls).
CEILING_WORKLOADS = ["px_allreduce", "px_execute", "px_magic", "broadcast", "push", "scatter_gather"]


def summarise(res: dict, lifecycles: list, ns: list) -> None:
    """The run's analysis, verdict and ceilings (also for --report on a saved JSON);
    bench/_report.py."""
    against = res["config"].get("against", False)
    res["analysis"] = R.engines_analysis(lifecycles, ns, METRICS, against)
    res["verdict"] = R.engines_verdict(res["analysis"], ns, METRICS, against)
    res["ceiling"] = R.engines_ceiling(lifecycles, ns, res["machine"]["before"]["ncpu"],
                                       CEILING_WORKLOADS)


def print_report(res: dict) -> None:
    R.print_engines_report(res, METRICS)


def snapshot(snap: Path, px_path: str, pxe_path: str, old: Optional[dict]):
    """Copy what pxfabric runs (both binaries and python/pxfabric, which pxengine imports from
    the source tree; with --against-* the old side's too) into ``snap``: someone may rebuild
    build/bin during the run, and one run must not mix two builds. Sets $PXF_PYTHONPATH for
    the new side's pxengine. Returns (binaries for the JSON, px_path, pxe_path, old), the
    paths now those of the copies."""
    binfo = H.binary_info
    binaries = {"pxcontroller": binfo(px_path), "pxengine": binfo(pxe_path)}
    (snap / "bin").mkdir(parents=True)
    px_path = str(shutil.copy2(px_path, snap / "bin" / "pxcontroller"))
    pxe_path = str(shutil.copy2(pxe_path, snap / "bin" / "pxengine"))
    binaries["snapshot"] = {"pxcontroller": px_path, "pxengine": pxe_path}
    if old:
        binaries["against"] = {"pxcontroller": binfo(old["pxcontroller"]),
                               "pxengine": binfo(old["pxengine"])}
        (snap / "old-bin").mkdir()
        copies = {k: str(shutil.copy2(old[k], snap / "old-bin" / k))
                  for k in ("pxcontroller", "pxengine")}
        binaries["against"]["snapshot"] = dict(copies)
        if old.get("pythonpath"):
            oldpy = Path(old["pythonpath"]) / "pxfabric"
            shutil.copytree(oldpy, snap / "old-python" / "pxfabric",
                            ignore=shutil.ignore_patterns("__pycache__"))
            copies["pythonpath"] = str(snap / "old-python")
            binaries["against"]["pxf_pythonpath"] = f"snapshot of {oldpy}"
        old = copies
    pysrc = H.REPO / "python" / "pxfabric"
    if os.environ.get("PXF_PYTHONPATH"):
        binaries["pxf_pythonpath"] = os.environ["PXF_PYTHONPATH"] + " (from the environment)"
    elif pysrc.is_dir():
        shutil.copytree(pysrc, snap / "python" / "pxfabric", ignore=shutil.ignore_patterns("__pycache__"))
        os.environ["PXF_PYTHONPATH"] = str(snap / "python")  # read by pxengine; inherited by mpiexec
        binaries["pxf_pythonpath"] = f"snapshot of {pysrc}"
    return binaries, px_path, pxe_path, old


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    full = dict(reps=3, ns="2,4,8", calls=40, warmup=3, pushes=8, push_mb=8, scatters=3,
                scatter_n=10_000_000, tasks=2000, idle_wait=5.0, idle_measure=5.0, timeout=3000.0)
    quick = dict(full, reps=1, ns="2", calls=8, warmup=2, pushes=2, scatters=1, scatter_n=1_000_000,
                 tasks=200, idle_wait=2.0, idle_measure=2.0, timeout=240.0)
    ap.add_argument("--reps", type=int, help="interleaved reps (cluster lifetimes) per kind and N (default 3)")
    ap.add_argument("--ns", help="comma list of rank counts (default 2,4,8)")
    ap.add_argument("--calls", type=int, help="timed calls per latency workload per rep (default 40)")
    ap.add_argument("--warmup", type=int, help="untimed calls before each latency workload (default 3)")
    ap.add_argument("--pushes", type=int, help="timed pushes per rep (default 8)")
    ap.add_argument("--push-mb", type=int, help="push payload, MB of float64 (default 8)")
    ap.add_argument("--scatters", type=int, help="scatter+gather rounds per rep (default 3)")
    ap.add_argument("--scatter-n", type=int,
                    help="np.arange(N) is scattered, int64 (default 10,000,000 = 80 MB)")
    ap.add_argument("--tasks", type=int, help="tasks of the load-balanced map (default 2000)")
    ap.add_argument("--idle-wait", type=float, help="idle seconds before the idle CPU window (default 5)")
    ap.add_argument("--idle-measure", type=float, help="idle CPU window, s (default 5)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (well under 2 min): defaults become 1 rep, N=2, 8 calls, 2 pushes, "
                         "1 scatter of 1,000,000, 200 tasks, idle 2+2 s, timeout 240 s; options given "
                         "explicitly still win")
    ap.add_argument("--workloads", default=",".join(WORKLOAD_NAMES),
                    help="comma list, subset of: " + ",".join(WORKLOAD_NAMES) + " (startup always)")
    ap.add_argument("--call-timeout", type=float, default=120.0, help="limit for any one call, s (default 120)")
    ap.add_argument("--timeout", type=float,
                    help="hard limit for the whole run in s (default 3000, --quick 240)")
    ap.add_argument("--px-binary", default=None, help="pxcontroller (default $PXF_CONTROLLER or build/bin)")
    ap.add_argument("--pxengine", default=None, help="pxengine (default $PXF_PXENGINE or build/bin)")
    ap.add_argument("--against-px", metavar="PATH", default=None,
                    help="the stock side becomes this (older) pxcontroller with --against-pxengine "
                         "(default: the new pxengine); sides reported as new and old")
    ap.add_argument("--against-pxengine", metavar="PATH", default=None,
                    help="the stock side's engines: this (older) pxengine (with --against-px, "
                         "default: the new pxcontroller)")
    ap.add_argument("--against-pythonpath", metavar="DIR", default=None,
                    help="PXF_PYTHONPATH of the old pxengine (a dir holding pxfabric/; default: "
                         "the new side's snapshot of python/)")
    ap.add_argument("--json", default=None,
                    help="where to write the JSON (default bench/results/engines-<UTC>[-quick].json)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (controller/engine logs)")
    ap.add_argument("--report", metavar="JSON", default=None,
                    help="run nothing: recompute and print the tables of a saved run's JSON")
    a = ap.parse_args()
    if a.report:
        res = json.loads(Path(a.report).read_text())
        summarise(res, res["lifecycles"], res["config"]["ns"])
        print_report(res)
        print(f"\nrun took {res['run_wall_s'] / 60:.1f} min (started {res['started_utc']})")
        return 0
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    ns = [int(x) for x in a.ns.split(",") if x]
    names = [w for w in a.workloads.split(",") if w]
    bad = [w for w in names if w not in WORKLOAD_NAMES]
    if bad:
        ap.error(f"unknown workloads {bad}")

    H.install_time_limit(a.timeout)
    px_path = H.px_binary(a.px_binary)
    pxe_path = H.pxengine_binary(a.pxengine)
    against = bool(a.against_px or a.against_pxengine)
    if a.against_pythonpath and not against:
        ap.error("--against-pythonpath needs --against-px or --against-pxengine")
    old = None
    if against:  # the older pxfabric; a binary not given is the new one
        old = {"pxcontroller": H.px_binary(a.against_px or px_path),
               "pxengine": H.pxengine_binary(a.against_pxengine or pxe_path)}
        if a.against_pythonpath:
            old["pythonpath"] = str(Path(a.against_pythonpath).resolve())
            if not (Path(old["pythonpath"]) / "pxfabric" / "__init__.py").is_file():
                ap.error(f"--against-pythonpath {a.against_pythonpath}: no pxfabric package in it")
    label = R.sides(LABEL, against)
    mpiexec = H.mpiexec()
    import ipyparallel
    import mpi4py
    import numpy
    import zmq

    tmp = Path(tempfile.mkdtemp(prefix="pxbench-eng-"))
    os.environ["IPYTHONDIR"] = str(tmp / "ipython-client")  # the InteractiveShell for %px
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config
    shell_cfg = Config()
    shell_cfg.HistoryManager.enabled = False  # no sqlite file in the temp dir we remove
    shell = InteractiveShell.instance(config=shell_cfg)

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    snap = tmp / "snapshot"
    binaries, px_path, pxe_path, old = snapshot(snap, px_path, pxe_path, old)

    mpiver = ""
    try:
        mpiver = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                                timeout=20).stdout.splitlines()[0]
    except Exception:  # noqa: BLE001
        pass
    res = {
        "bench": "engines",
        "started_utc": stamp,
        "config": {k: getattr(a, k) for k in ("reps", "calls", "warmup", "pushes", "push_mb", "scatters",
                                              "scatter_n", "tasks", "idle_wait", "idle_measure",
                                              "quick", "call_timeout", "timeout")},
        "sides": label,
        "binaries": binaries,
        "argv": {
            "controller_args": ["--profile-dir=<tmp>", "--ip=127.0.0.1", "--ping=250"],
            "stock_controller": [H.PYTHON, "-m", "ipyparallel.controller"],
            "px_controller": [px_path],
            "engine_job": [mpiexec, "-n", "N", "<program>", "--profile-dir=<tmp>", "--log-level=20"],
            "stock_engine_program": H.STOCK_MPI_ENGINE,
            "px_engine_program": [pxe_path],
            "mpi_env": H.MPI_ENV,
        },
        "versions": {"python": platform.python_version(), "ipyparallel": ipyparallel.__version__,
                     "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "mpi4py": mpi4py.__version__,
                     "numpy": numpy.__version__, "mpi": mpiver},
        "machine": {},
    }
    res["config"].update(ns=ns, workloads=names, against=against)
    if old:
        res["argv"].update(old_controller=[old["pxcontroller"]], old_engine_program=[old["pxengine"]])
    print(f"bench_engines: N={ns} reps={a.reps} calls={a.calls} pushes={a.pushes}x{a.push_mb}MB "
          f"scatters={a.scatters}x{a.scatter_n:,} tasks={a.tasks}  (2 cores: N>2 is oversubscribed)",
          flush=True)
    print(f"  px: {binaries['pxcontroller']['path']} (mtime {binaries['pxcontroller']['mtime']}) + "
          f"{binaries['pxengine']['path']} (mtime {binaries['pxengine']['mtime']}), run from copies "
          f"in {snap}", flush=True)
    if old:
        ob = binaries["against"]
        print(f"  against (old): {ob['pxcontroller']['path']} (mtime {ob['pxcontroller']['mtime']}) + "
              f"{ob['pxengine']['path']} (mtime {ob['pxengine']['mtime']})", flush=True)
    res["machine"]["before"] = H.machine_load()
    print(f"machine load before: {res['machine']['before']}", flush=True)

    lifecycles = []
    rc_exit = 0
    t_run = time.perf_counter()
    try:
        for rep in range(a.reps):
            for ni, n in enumerate(ns):
                order = ("px", "stock") if (rep + ni) % 2 == 0 else ("stock", "px")
                for kind in order:
                    wd = tmp / f"{kind}-n{n}-r{rep}"
                    wd.mkdir()
                    lc = Lifecycle(kind, n, rep, wd, a, px_path, pxe_path, shell, old=old,
                                   label=label[kind])
                    lc.out["first"] = kind == order[0]
                    g0 = None
                    t0 = time.perf_counter()
                    try:
                        deadline = time.monotonic() + min(180.0, H.remaining_alarm() - 10)
                        lc.start(deadline)
                        g0 = H.CpuSnapshot(lc.groups())
                        lc.run(names)
                    except (H.HardTimeout, KeyboardInterrupt):
                        raise
                    except Exception as e:  # noqa: BLE001  (one bad cluster does not end the run)
                        lc.out["error"] = f"{type(e).__name__}: {e}"[:4000]
                        lc.out["traceback"] = traceback.format_exc()[-4000:]
                        if lc.c.controller is not None and lc.c.controller.poll() is not None:
                            lc.out["error"] += f" [controller exited {lc.c.controller.returncode}]"
                        dead = [p.pid for p in lc.c.engines if p.poll() is not None]
                        if dead:
                            lc.out["error"] += f" [mpiexec exited {lc.c.engines[0].returncode}]"
                        print(f"ERROR rep {rep + 1} N={n} {label[kind]}: {lc.out['error'][:1500]}",
                              flush=True)
                        lc.out["kept_dir"] = str(wd)
                        rc_exit = 1
                    finally:
                        if g0 is not None:
                            try:
                                lc.out["cpu"]["lifetime"] = g0.delta(H.CpuSnapshot(lc.groups()))
                            except Exception:  # noqa: BLE001
                                pass
                        # stopping must not be interrupted (the watchdog thread still backs us up)
                        left, ts = _signal.alarm(0), time.perf_counter()
                        try:
                            lc.stop()
                        finally:
                            if left:
                                _signal.alarm(max(1, int(left - (time.perf_counter() - ts))))
                        lc.out["wall_s"] = time.perf_counter() - t0
                        lifecycles.append(lc.out)
                        if not a.keep and "error" not in lc.out:
                            shutil.rmtree(wd, ignore_errors=True)
                    m = lc.out["metrics"]
                    cpu = lc.out["cpu"].get("lifetime")
                    foreign = f"{100 * cpu['foreign'] / cpu['wall']:.0f}%" if cpu else "-"
                    print(f"rep {rep + 1}/{a.reps} N={n} {label[kind]:<8} "
                          f"up {fmt(m.get('startup_ready'))}s | allreduce {fmt(m.get('px_allreduce'))} "
                          f"exec {fmt(m.get('px_execute'))} %px {fmt(m.get('px_magic'))} "
                          f"bcast {fmt(m.get('broadcast'))} ms | push {fmt(m.get('push'))} "
                          f"s+g {fmt(m.get('scatter_gather'))} ms | lb {fmt(m.get('lb_map'))}/s | "
                          f"idle rank {fmt(m.get('idle_rank_cpu'))}% ctrl {fmt(m.get('idle_controller_cpu'))}% "
                          f"| foreign {foreign} | {lc.out['wall_s']:.0f}s", flush=True)
    except BaseException as e:  # noqa: BLE001  (HardTimeout, KeyboardInterrupt too)
        res["error"] = f"{type(e).__name__}: {e}"
        print(f"ERROR: {res['error']}", file=sys.stderr, flush=True)
        rc_exit = 1
    finally:
        _signal.alarm(0)
        left = list(H._ALL_CLUSTERS)
        if left:
            res["stop_leftover"] = H.stop_clusters(left)
        if a.keep or rc_exit:
            res["kept_dir"] = str(tmp)
            print(f"logs kept in {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    res["run_wall_s"] = time.perf_counter() - t_run
    res["machine"]["after"] = H.machine_load()
    fr = [100 * lc["cpu"]["lifetime"]["foreign"] / lc["cpu"]["lifetime"]["wall"]
          for lc in lifecycles if "lifetime" in lc.get("cpu", {})]
    if fr:
        res["machine"]["during"] = {"foreign_pct_of_one_core_median": H.median(fr),
                                    "foreign_pct_of_one_core_max": max(fr),
                                    "foreign_pct_of_one_core_per_lifecycle": fr}
    res["lifecycles"] = lifecycles
    summarise(res, lifecycles, ns)
    if res["analysis"]:
        print_report(res)
    print(f"\nrun took {res['run_wall_s'] / 60:.1f} min; machine load after: {res['machine']['after']}")
    errs = [lc for lc in lifecycles if "error" in lc]
    for lc in errs:
        print(f"error in rep {lc['rep'] + 1} N={lc['n']} {label[lc['kind']]}: {lc['error'][:300]}")
    ids = {(lc["kind"], lc["n"]): lc.get("ids_equal_ranks") for lc in lifecycles}
    if any(v is False for v in ids.values()):
        print(f"engine id != MPI rank for: {[k for k, v in ids.items() if v is False]}")
    sk = [(lc["kind"], lc["n"], lc["rep"], lc["stop"].get("needed_sigkill")) for lc in lifecycles
          if lc.get("stop", {}).get("needed_sigkill") or lc.get("stop", {}).get("left_alive")]
    print("stop: " + ("every process exited on SIGTERM" if not sk else f"needed SIGKILL / left alive: {sk}"))
    for kind in H.KINDS:
        n_ctl = sum(lc.get("controller_log", {}).get("count", 0) for lc in lifecycles if lc["kind"] == kind)
        n_eng = sum(lc.get("engine_log", {}).get("count", 0) for lc in lifecycles if lc["kind"] == kind)
        ex = [l for lc in lifecycles if lc["kind"] == kind
              for l in lc.get("controller_log", {}).get("lines", [])[:1] + lc.get("engine_log", {}).get("lines", [])[:1]]
        print(f"{label[kind]} logs: {n_ctl} controller and {n_eng} engine-job warning/error lines"
              + (f", e.g. {ex[:2]}" if ex else ""))

    out = Path(a.json) if a.json else HERE / "results" / f"engines-{stamp}{'-quick' if a.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, sort_keys=True, default=str) + "\n")
    print(f"JSON: {out}")
    if rc_exit:
        print(f"run had errors: {res.get('error') or len(errs)}", file=sys.stderr)
    return rc_exit


if __name__ == "__main__":
    sys.exit(main())
