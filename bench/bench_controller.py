#!/usr/bin/python3
"""pxcontroller vs the stock ipcontroller, same stock-client workloads, interleaved.

Both controllers run at the same time, each with 4 stock engines in its own private profile
directory (argv for both: --profile-dir=<tmp> --ip=127.0.0.1 --ping=250). Every rep runs
each workload once on each controller, back to back, alternating which goes first, so slow
drifts in machine load hit both sides alike. Ratios are computed per rep (paired) and their
median is what we quote.

Workloads (stock ipyparallel.Client calls):
  direct_apply     rc[0].apply_sync(lambda: None)                         ms/call
  broadcast_apply  rc.broadcast_view().apply_sync(lambda: 1)              ms/call
  dview_execute    rc[:].execute('a=1', block=True)                       ms/call
  lb_map           lview.map_async(f, range(N), chunksize=1)              tasks/s
  lb_apply         [lview.apply_async(f) for _ in range(N)]               tasks/s
and the controller's CPU (whole process tree, psutil cpu_times deltas) per 1,000 tasks.

With --against-px PATH the stock side is a second pxcontroller instead (an older build): new
(--px-binary) and old are measured the same way, paired rep by rep, and reported as "new" and
"old" (before/after benchmarks of a change to pxcontroller).

Usage:  /usr/bin/python3 bench/bench_controller.py [--quick] [--reps 5] [--tasks 2000]
        [--calls 200] [--json PATH]     (PXF_CONTROLLER or --px-binary picks the binary)
        [--against-px OLD_PXCONTROLLER]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import psutil  # noqa: E402

import _harness as H  # noqa: E402
import _report as R  # noqa: E402

HERE = Path(__file__).resolve().parent


def f(x=None):
    return x


# (name, kind of metric, unit, description)
WORKLOADS = [
    ("direct_apply", "latency", "ms/call", "rc[0].apply_sync(lambda: None)"),
    ("broadcast_apply", "latency", "ms/call", "rc.broadcast_view().apply_sync(lambda: 1)"),
    ("dview_execute", "latency", "ms/call", "rc[:].execute('a=1', block=True)"),
    ("lb_map", "rate", "tasks/s", "lview.map_async(f, range(N), chunksize=1)"),
    ("lb_apply", "rate", "tasks/s", "[lview.apply_async(f) for _ in range(N)]"),
]


class Runner:
    """Views of one cluster and the code of each workload."""

    def __init__(self, cluster: H.Cluster, other: H.Cluster):
        self.c = cluster
        self.other = other
        rc = cluster.client
        self.rc = rc
        self.e0 = rc[0]
        self.bv = rc.broadcast_view()
        self.dv = rc[:]
        self.lv = rc.load_balanced_view()
        self.n = len(rc.ids)

    def timeout(self) -> float:
        return max(5.0, min(300.0, H.remaining_alarm() - 5))

    def groups(self):
        me = [psutil.Process(os.getpid())]
        return {"controller": self.c.controller_procs(), "engines": self.c.engine_procs(),
                "client": me, "other_cluster": self.other.all_procs()}

    def clean(self) -> None:
        H.clear_client_caches(self.rc)

    # ---- one call of each latency workload

    def call(self, name: str):
        T = self.timeout()
        if name == "direct_apply":
            r = self.e0.apply_async(lambda: None).get(timeout=T)
            assert r is None, r
        elif name == "broadcast_apply":
            r = self.bv.apply_async(lambda: 1).get(timeout=T)
            assert list(r) == [1] * self.n, r
        elif name == "dview_execute":
            self.dv.execute("a=1", block=False).get(timeout=T)
        else:
            raise ValueError(name)

    # NB: apply_sync/execute(block=True) are exactly apply_async(...).get() with no timeout;
    # we use the async form with a timeout so a stall fails the rep instead of hanging.

    def latency_rep(self, name: str, calls: int) -> dict:
        self.clean()
        g = self.groups()
        s0 = H.CpuSnapshot(g)
        ms = []
        for _ in range(calls):
            t = time.perf_counter()
            self.call(name)
            ms.append((time.perf_counter() - t) * 1e3)
        cpu = s0.delta(H.CpuSnapshot(g))
        return {"value": H.median(ms), "calls_ms": ms, "cpu": cpu, "ops": calls}

    def rate_rep(self, name: str, tasks: int) -> dict:
        self.clean()
        g = self.groups()
        T = self.timeout()
        out = {}
        s0 = H.CpuSnapshot(g)
        t = time.perf_counter()
        if name == "lb_map":
            res = self.lv.map_async(f, range(tasks), chunksize=1).get(timeout=T)
            ok = list(res) == list(range(tasks))
        else:
            ars = [self.lv.apply_async(f) for _ in range(tasks)]
            out["submit_s"] = time.perf_counter() - t
            ok = all(ar.get(timeout=T) is None for ar in ars)
        wall = time.perf_counter() - t
        cpu = s0.delta(H.CpuSnapshot(g))
        if not ok:
            raise AssertionError(f"{name}: wrong results on {self.c.label}")
        out.update(value=tasks / wall, wall_s=wall, cpu=cpu, ops=tasks)
        return out

    def warmup(self, calls: int, tasks: int) -> None:
        for name in ("direct_apply", "broadcast_apply", "dview_execute"):
            for _ in range(calls):
                self.call(name)
        self.lv.map_async(f, range(tasks), chunksize=1).get(timeout=self.timeout())
        self.clean()


fmt = R.fmt  # one number format for every report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="interleaved reps per workload (default 5)")
    ap.add_argument("--tasks", type=int, default=2000, help="tasks per load-balanced rep (default 2000)")
    ap.add_argument("--calls", type=int, default=200,
                    help="calls per direct_apply rep; broadcast/execute use calls/2 (default 200)")
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 reps, 100 tasks, 20 calls (< 1 min)")
    ap.add_argument("--workloads", default=",".join(w[0] for w in WORKLOADS),
                    help="comma list, subset of: " + ",".join(w[0] for w in WORKLOADS))
    ap.add_argument("--timeout", type=float, default=None,
                    help="hard limit for the whole run in s (default 1500, --quick 150)")
    ap.add_argument("--px-binary", default=None, help="pxcontroller to run (default $PXF_CONTROLLER or build/bin)")
    ap.add_argument("--against-px", metavar="PATH", default=None,
                    help="measure against this pxcontroller (an older build) instead of the stock "
                         "ipcontroller; the report calls the sides new and old")
    ap.add_argument("--px-prefix", default="",
                    help="command prefix for pxcontroller, e.g. 'valgrind --tool=callgrind' (profiling)")
    ap.add_argument("--json", default=None, help="where to write the JSON (default bench/results/controller-<UTC>.json)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (controller/engine logs)")
    a = ap.parse_args()
    if a.quick:
        a.reps, a.tasks, a.calls = 2, 100, 20
    if a.timeout is None:
        a.timeout = 150 if a.quick else 1500
    names = [w for w in a.workloads.split(",") if w]
    bad = [w for w in names if w not in {x[0] for x in WORKLOADS}]
    if bad:
        ap.error(f"unknown workloads {bad}")
    lat_calls = {"direct_apply": a.calls, "broadcast_apply": max(1, a.calls // 2),
                 "dview_execute": max(1, a.calls // 2)}

    H.install_time_limit(a.timeout)
    px_path = H.px_binary(a.px_binary)
    against = bool(a.against_px)
    old_path = H.px_binary(a.against_px) if against else None
    label = ({"px": "new pxcontroller", "stock": "old pxcontroller"} if against else dict(H.LABEL))
    short = R.sides({"px": "px", "stock": "stock"}, against)  # in the progress lines
    st = os.stat(px_path)
    import ipyparallel
    import zmq

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = {
        "bench": "controller",
        "started_utc": stamp,
        "config": {"reps": a.reps, "tasks": a.tasks, "calls": a.calls, "engines": a.engines,
                   "quick": a.quick, "workloads": names, "latency_calls_per_rep": lat_calls,
                   "ping_ms": 250, "px_prefix": a.px_prefix, "against": against},
        "sides": R.sides(R.CONTROLLER_SIDES, against),
        "px_binary": {"path": px_path, "mtime": _dt.datetime.fromtimestamp(st.st_mtime).isoformat(),
                      "size": st.st_size},
        "versions": {"python": platform.python_version(), "ipyparallel": ipyparallel.__version__,
                     "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()},
        "machine": {},
    }
    if against:
        res["against_binary"] = H.binary_info(old_path)
    print(f"bench_controller: px={px_path}{f'  against={old_path}' if against else ''}  reps={a.reps} tasks={a.tasks} calls={a.calls}", flush=True)
    res["machine"]["before"] = H.machine_load()
    print(f"machine load before: {res['machine']['before']}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="pxbench-"))
    clusters = {}
    reps_data = {n: {"px": [], "stock": []} for n in names}
    rc_exit = 0
    try:
        # both clusters start together (saves ~10 s); start-up times are therefore only
        # indicative (8 engines import at once on a busy machine)
        deadline = time.monotonic() + min(180.0, H.remaining_alarm() - 10)
        for kind in ("stock", "px"):
            (tmp / kind).mkdir()
            # with --against-px the stock side is the old pxcontroller (same prefix, e.g. a profiler)
            old_px = against and kind == "stock"
            clusters[kind] = H.Cluster("px" if old_px else kind, tmp / kind, a.engines,
                                       old_path if old_px else px_path,
                                       px_prefix=a.px_prefix if kind == "px" or old_px else "",
                                       label=label[kind])
        print(f"starting both controllers + {a.engines} engines each ...", flush=True)
        for c in clusters.values():
            c.start_controller(deadline)
        for c in clusters.values():
            c.start_engines()
        for kind, c in clusters.items():
            c.connect(deadline)
            print(f"  {label[kind]} up: connection files {c.timings['connection_files_s']:.2f}s, "
                  f"{a.engines} engines registered {c.timings['all_engines_registered_s']:.2f}s; "
                  f"controller processes {len(c.controller_procs())}, engine processes "
                  f"{len(c.engine_procs())}", flush=True)
        res["startup"] = {k: dict(c.timings, controller_processes=len(c.controller_procs()),
                                  engine_processes=len(c.engine_procs()))
                          for k, c in clusters.items()}
        runners = {"px": Runner(clusters["px"], clusters["stock"]),
                   "stock": Runner(clusters["stock"], clusters["px"])}
        print("warming up ...", flush=True)
        for k in ("stock", "px"):
            try:
                runners[k].warmup(calls=max(2, a.calls // 10), tasks=max(20, a.tasks // 10))
            except Exception:
                clusters[k].check_alive()
                raise

        m0 = H.machine_busy_seconds()
        own0 = sum(H.proc_cpu(c.all_procs()) for c in clusters.values()) + H.proc_cpu([psutil.Process()])
        t0 = time.perf_counter()
        for rep in range(a.reps):
            for wi, name in enumerate(names):
                order = ("px", "stock") if (rep + wi) % 2 == 0 else ("stock", "px")
                for kind in order:
                    r = runners[kind]
                    try:
                        if name in lat_calls:
                            d = r.latency_rep(name, lat_calls[name])
                        else:
                            d = r.rate_rep(name, a.tasks)
                    except Exception:
                        for c in clusters.values():
                            c.check_alive()  # a dead controller is the better error message
                        raise
                    d["rep"], d["first"] = rep, order[0] == kind
                    reps_data[name][kind].append(d)
                s, p = reps_data[name]["stock"][-1], reps_data[name]["px"][-1]
                unit = "ms" if name in lat_calls else "tasks/s"
                print(f"rep {rep + 1}/{a.reps} {name:<16} {short['stock']} {fmt(s['value']):>7} {unit:<7} "
                      f"{short['px']} {fmt(p['value']):>7} {unit:<7} | ctrl cpu {short['stock']} "
                      f"{s['cpu']['controller']:.2f}s {short['px']} {p['cpu']['controller']:.2f}s | foreign load "
                      f"{100 * (s['cpu']['foreign'] + p['cpu']['foreign']) / (s['cpu']['wall'] + p['cpu']['wall']):.0f}% of a core",
                      flush=True)
        wall = time.perf_counter() - t0
        busy = H.machine_busy_seconds() - m0
        own = sum(H.proc_cpu(c.all_procs()) for c in clusters.values()) + H.proc_cpu([psutil.Process()]) - own0
        res["machine"]["during"] = {
            "wall_s": wall,
            "busy_pct_of_all_cores": 100 * busy / wall / (os.cpu_count() or 1),
            "ours_pct_of_one_core": 100 * own / wall,
            "foreign_pct_of_one_core": 100 * max(0.0, busy - own) / wall,
        }

        # after the reps: compatibility probes and the controllers' own view of things
        probes = {}
        for kind, c in clusters.items():
            p = {}
            try:
                runners[kind].clean()
                c.client.purge_hub_results("all")
                p["purge_hub_results"] = "ok"
            except Exception as e:  # noqa: BLE001
                p["purge_hub_results"] = f"{type(e).__name__}: {e}"[:300]
            if c.kind == "px":
                try:
                    p["pxf_stats"] = c.px_stats()
                except Exception as e:  # noqa: BLE001
                    p["pxf_stats"] = f"error {e!r}"
            probes[kind] = p
        res["probes"] = probes
    except BaseException as e:  # noqa: BLE001  (HardTimeout, KeyboardInterrupt too)
        res["error"] = f"{type(e).__name__}: {e}"
        print(f"ERROR: {res['error']}", file=sys.stderr, flush=True)
        rc_exit = 1
    finally:
        import signal as _signal
        _signal.alarm(0)  # stopping must not be interrupted; the watchdog thread still backs us up
        for kind, c in clusters.items():
            try:
                res.setdefault("controller_log", {})[kind] = c.controller_log_problems()
            except Exception:  # noqa: BLE001
                pass
        infos = H.stop_clusters(list(clusters.values()))
        signal_safe_stop = dict(zip(clusters.keys(), infos))
        res["stop"] = signal_safe_stop
        if a.keep or rc_exit:
            res["kept_dir"] = str(tmp)
            print(f"logs kept in {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    res["machine"]["after"] = H.machine_load()
    res["raw_reps"] = {n: {k: [{kk: vv for kk, vv in r.items() if kk != "calls_ms"} for r in v]
                           for k, v in d.items()} for n, d in reps_data.items()}
    res["analysis"] = R.controller_analysis(reps_data, WORKLOADS)
    res["verdict"] = R.controller_verdict(res["analysis"], against)
    if res["analysis"]:
        R.print_controller_report(res, WORKLOADS)
    print(f"\nmachine load after: {res['machine']['after']}")
    for kind, s in res.get("stop", {}).items():
        print(f"stopped {label[kind]} cluster: {s}")
    for kind, lp in res.get("controller_log", {}).items():
        if lp.get("count"):
            print(f"{label[kind]} log: {lp['count']} warning/error lines, e.g. {lp['lines'][:3]}")
    if "probes" in res:
        for kind, p in res["probes"].items():
            print(f"{label[kind]} purge_hub_results('all'): {p['purge_hub_results']}")
            st_ = p.get("pxf_stats")
            if isinstance(st_, dict):
                drops = {k: v for k, v in st_.get("drops", {}).items() if v}
                print(f"{label[kind]} stats: drops {drops or 'none'}, waiting {st_.get('waiting')}, "
                      f"in_flight {st_.get('in_flight')}")

    out = Path(a.json) if a.json else HERE / "results" / f"controller-{stamp}{'-quick' if a.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, sort_keys=True, default=str) + "\n")
    print(f"JSON: {out}")
    if "error" in res:
        print(f"run FAILED: {res['error']}", file=sys.stderr)
    return rc_exit


if __name__ == "__main__":
    sys.exit(main())
