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

Usage:  /usr/bin/python3 bench/bench_controller.py [--quick] [--reps 5] [--tasks 2000]
        [--calls 200] [--json PATH]     (PXF_CONTROLLER or --px-binary picks the binary)
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
            raise AssertionError(f"{name}: wrong results on {H.LABEL[self.c.kind]}")
        out.update(value=tasks / wall, wall_s=wall, cpu=cpu, ops=tasks)
        return out

    def warmup(self, calls: int, tasks: int) -> None:
        for name in ("direct_apply", "broadcast_apply", "dview_execute"):
            for _ in range(calls):
                self.call(name)
        self.lv.map_async(f, range(tasks), chunksize=1).get(timeout=self.timeout())
        self.clean()


fmt = H.fmt  # one number format for every report


def analyse(reps_data: dict, tasks: int) -> dict:
    """reps_data[workload][kind] = list of rep dicts (index = rep)."""
    out = {}
    for name, metric, unit, _ in WORKLOADS:
        d = reps_data.get(name)
        if not d or not d["px"] or not d["stock"]:
            continue
        row = {"unit": unit, "metric": metric}
        for kind in H.KINDS:
            reps = d[kind]
            vals = [r["value"] for r in reps]
            row[kind] = H.summary(vals)
            row[kind]["reps"] = vals
            ctrl = [r["cpu"]["controller"] for r in reps]
            per_op = [c / r["ops"] for c, r in zip(ctrl, reps)]
            row[kind]["ctrl_cpu_s_per_1000_ops"] = H.median(p * 1000 for p in per_op)
            row[kind]["ctrl_cpu_s_per_1000_ops_reps"] = [p * 1000 for p in per_op]
            row[kind]["ctrl_user_s_per_1000_ops"] = H.median(
                1000 * r["cpu"]["controller_user"] / r["ops"] for r in reps)
            row[kind]["ctrl_system_s_per_1000_ops"] = H.median(
                1000 * r["cpu"]["controller_system"] / r["ops"] for r in reps)
            row[kind]["ctrl_cpu_pct_of_core"] = H.median(
                100 * r["cpu"]["controller"] / r["cpu"]["wall"] for r in reps)
            row[kind]["engines_cpu_pct_of_core"] = H.median(
                100 * r["cpu"]["engines"] / r["cpu"]["wall"] for r in reps)
            row[kind]["client_cpu_pct_of_core"] = H.median(
                100 * r["cpu"]["client"] / r["cpu"]["wall"] for r in reps)
            row[kind]["idle_other_cluster_cpu_pct_of_core"] = H.median(
                100 * r["cpu"]["other_cluster"] / r["cpu"]["wall"] for r in reps)
            row[kind]["foreign_cpu_pct_of_core"] = H.median(
                100 * r["cpu"]["foreign"] / r["cpu"]["wall"] for r in reps)
            if metric == "latency":
                allc = [x for r in reps for x in r["calls_ms"]]
                row[kind]["all_calls"] = H.summary(allc)
            if name == "lb_apply":
                row[kind]["submit_s_reps"] = [r["submit_s"] for r in reps]
        n = min(len(d["px"]), len(d["stock"]))
        if metric == "latency":  # better = lower; ratio = stock/px (>1: px faster)
            paired = [d["stock"][i]["value"] / d["px"][i]["value"] for i in range(n)]
            ratio_of_medians = row["stock"]["median"] / row["px"]["median"]
        else:  # better = higher; ratio = px/stock (>1: px faster)
            paired = [d["px"][i]["value"] / d["stock"][i]["value"] for i in range(n)]
            ratio_of_medians = row["px"]["median"] / row["stock"]["median"]
        row["speedup_paired"] = H.summary(paired)
        row["speedup_paired"]["reps"] = paired
        row["speedup_of_medians"] = ratio_of_medians
        cp = [d["stock"][i]["cpu"]["controller"] / d["px"][i]["cpu"]["controller"]
              if d["px"][i]["cpu"]["controller"] > 0 else None for i in range(n)]
        cp = [x for x in cp if x is not None]
        row["ctrl_cpu_stock_over_px_paired"] = H.summary(cp) if cp else None
        out[name] = row
    return out


def print_report(res: dict) -> None:
    A = res["analysis"]
    print()
    print(f"pxcontroller vs stock ipcontroller, {res['config']['engines']} stock engines each, "
          f"{res['config']['reps']} interleaved reps, tasks={res['config']['tasks']}, "
          f"calls={res['config']['calls']}")
    mb = res["machine"]["before"]
    print(f"machine before: {mb['ncpu']} cpus, busy {mb['cpu_busy_pct_1s']:.0f}% of all cores over 1 s, "
          f"loadavg {mb['loadavg_1_5_15']}")
    if "during" in res["machine"]:
        md = res["machine"]["during"]
        print(f"machine during reps: busy {md['busy_pct_of_all_cores']:.0f}% of all cores; "
              f"other users (not our processes) {md['foreign_pct_of_one_core']:.0f}% of one core")
    print()
    hdr = (f"{'workload':<16} {'unit':<8} {'stock':>8} {'px':>8} {'speedup':>8} "
           f"{'paired (min..max)':>18} {'stock reps min..max':>20} {'px reps min..max':>18}")
    print(hdr)
    print("-" * len(hdr))
    for name, metric, unit, _ in WORKLOADS:
        r = A.get(name)
        if not r:
            continue
        sp = r["speedup_paired"]
        print(f"{name:<16} {unit:<8} {fmt(r['stock']['median']):>8} {fmt(r['px']['median']):>8} "
              f"{fmt(sp['median']):>7}x {fmt(sp['min']) + '..' + fmt(sp['max']):>18} "
              f"{fmt(r['stock']['min']) + '..' + fmt(r['stock']['max']):>20} "
              f"{fmt(r['px']['min']) + '..' + fmt(r['px']['max']):>18}")
    print("speedup = median over reps of the paired ratio: stock/px for ms/call, px/stock for tasks/s "
          "(>1 means pxcontroller is faster)")
    print()
    hdr2 = (f"{'controller CPU':<16} {'stock':>10} {'px':>10} {'stock/px':>9} {'px % of stock':>14} "
            f"{'stock %core':>11} {'px %core':>9} {'px usr/sys':>12}")
    print(hdr2)
    print("-" * len(hdr2))
    for name, metric, unit, _ in WORKLOADS:
        r = A.get(name)
        if not r:
            continue
        s, p = r["stock"]["ctrl_cpu_s_per_1000_ops"], r["px"]["ctrl_cpu_s_per_1000_ops"]
        per = "s/1000 tasks" if metric == "rate" else "s/1000 calls"
        ratio = s / p if p else None
        print(f"{name:<16} {fmt(s, 3):>10} {fmt(p, 3):>10} {fmt(ratio):>8}x "
              f"{fmt(100 * p / s if s else None, 1):>13}% {fmt(r['stock']['ctrl_cpu_pct_of_core'], 0):>10}% "
              f"{fmt(r['px']['ctrl_cpu_pct_of_core'], 0):>8}% "
              f"{fmt(r['px']['ctrl_user_s_per_1000_ops'], 2) + '/' + fmt(r['px']['ctrl_system_s_per_1000_ops'], 2):>12}"
              f"   ({per})")
    print("controller CPU = user+system seconds of the controller's whole process tree "
          "(stock: every process; px: one), median over reps; px usr/sys = its user and system parts")
    print()
    for line in res["verdict"]["lines"]:
        print(line)


def verdict(A: dict) -> dict:
    lines = []
    ok_cpu = True
    for name in ("lb_map", "lb_apply"):
        r = A.get(name)
        if not r:
            continue
        s, p = r["stock"]["ctrl_cpu_s_per_1000_ops"], r["px"]["ctrl_cpu_s_per_1000_ops"]
        frac = p / s if s else float("inf")
        good = frac <= 0.1
        ok_cpu &= good
        lines.append(f"goal CPU/task <= 1/10 of stock, {name}: px uses {100 * frac:.1f}% of stock "
                     f"({s:.3f} vs {p:.3f} s/1000 tasks) -> {'MET' if good else 'NOT MET'}")
    slower = []
    for name, r in A.items():
        sp = r["speedup_paired"]
        if sp["median"] < 1.0:
            noise = ", range straddles 1: within noise" if sp["max"] >= 1.0 else ", slower in every rep"
            slower.append(f"{name} (paired speedup {sp['median']:.2f}x, reps {sp['min']:.2f}..{sp['max']:.2f}{noise})")
    lines.append("goal no workload slower: " + ("MET" if not slower else "NOT MET: " + "; ".join(slower)))
    return {"cpu_goal_met": ok_cpu, "no_slower_goal_met": not slower, "lines": lines}


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
    st = os.stat(px_path)
    import ipyparallel
    import zmq

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = {
        "bench": "controller",
        "started_utc": stamp,
        "config": {"reps": a.reps, "tasks": a.tasks, "calls": a.calls, "engines": a.engines,
                   "quick": a.quick, "workloads": names, "latency_calls_per_rep": lat_calls,
                   "ping_ms": 250, "px_prefix": a.px_prefix},
        "px_binary": {"path": px_path, "mtime": _dt.datetime.fromtimestamp(st.st_mtime).isoformat(),
                      "size": st.st_size},
        "versions": {"python": platform.python_version(), "ipyparallel": ipyparallel.__version__,
                     "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()},
        "machine": {},
    }
    print(f"bench_controller: px={px_path}  reps={a.reps} tasks={a.tasks} calls={a.calls}", flush=True)
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
            clusters[kind] = H.Cluster(kind, tmp / kind, a.engines, px_path,
                                       px_prefix=a.px_prefix if kind == "px" else "")
        print(f"starting both controllers + {a.engines} engines each ...", flush=True)
        for c in clusters.values():
            c.start_controller(deadline)
        for c in clusters.values():
            c.start_engines()
        for kind, c in clusters.items():
            c.connect(deadline)
            print(f"  {H.LABEL[kind]} up: connection files {c.timings['connection_files_s']:.2f}s, "
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
                print(f"rep {rep + 1}/{a.reps} {name:<16} stock {fmt(s['value']):>7} {unit:<7} "
                      f"px {fmt(p['value']):>7} {unit:<7} | ctrl cpu stock {s['cpu']['controller']:.2f}s "
                      f"px {p['cpu']['controller']:.2f}s | foreign load "
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
            if kind == "px":
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
    res["analysis"] = analyse(reps_data, a.tasks)
    res["verdict"] = verdict(res["analysis"])
    if res["analysis"]:
        print_report(res)
    print(f"\nmachine load after: {res['machine']['after']}")
    for kind, s in res.get("stop", {}).items():
        print(f"stopped {H.LABEL[kind]} cluster: {s}")
    for kind, lp in res.get("controller_log", {}).items():
        if lp.get("count"):
            print(f"{H.LABEL[kind]} log: {lp['count']} warning/error lines, e.g. {lp['lines'][:3]}")
    if "probes" in res:
        for kind, p in res["probes"].items():
            print(f"{H.LABEL[kind]} purge_hub_results('all'): {p['purge_hub_results']}")
        st_ = res["probes"].get("px", {}).get("pxf_stats")
        if isinstance(st_, dict):
            drops = {k: v for k, v in st_.get("drops", {}).items() if v}
            print(f"pxcontroller stats: drops {drops or 'none'}, waiting {st_.get('waiting')}, "
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
