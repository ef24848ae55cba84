#!/usr/bin/python3
"""Load-balanced throughput and controller CPU per 1,000 tasks, for every scheme, with and
without dependencies: pxcontroller against the stock ipcontroller in one run.

For each scheme (leastload, lru, plainrandom, twobin, weighted) both controllers are started
with `--scheme=<name>` (plus the same --profile-dir/--ip/--ping argv) and 4 stock engines each,
at the same time; then, rep by rep and alternating which goes first, each runs:
  plain  lview.map_async(f, range(N), chunksize=1)
  deps   N tasks in batches of 100, each batch `after` three tasks of the previous one, every
         third batch `follow` one task of the previous one instead, every fifth also waiting
         for any of (a failed task, a succeeded one); all submitted before any is awaited
and records tasks/s and controller CPU (whole process tree, psutil) per 1,000 tasks.

Usage: /usr/bin/python3 bench/bench_schemes.py [--quick] [--reps 2] [--tasks 2000]
       [--schemes leastload,lru] [--px-binary PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

HERE = Path(__file__).resolve().parent
SCHEMES = ["leastload", "lru", "plainrandom", "twobin", "weighted"]
WORKLOADS = ["plain", "deps"]


def f(x=None):
    return x


def boom(x=None):
    raise ValueError(x)


class SchemeCluster(H.Cluster):
    def __init__(self, *a, extra_args=(), **kw):
        super().__init__(*a, **kw)
        self.extra_args = list(extra_args)

    def controller_argv(self):
        return super().controller_argv() + self.extra_args


def run_plain(lv, n, timeout):
    res = lv.map_async(f, range(n), chunksize=1).get(timeout=timeout)
    assert list(res) == list(range(n))


def run_deps(lv, n, timeout):
    from ipyparallel import Dependency

    batches, fails, prev = [], [], None
    for k in range(max(1, n // 100)):
        flags = {}
        if prev is not None:
            if k % 3 == 2:
                flags["follow"] = prev.msg_ids[:1]
            else:
                flags["after"] = prev.msg_ids[:3]
            if k % 5 == 4:
                bad = lv.apply_async(boom, k)
                fails.append(bad)
                flags["after"] = Dependency([bad.msg_ids[0], prev.msg_ids[-1]], all=False)
        with lv.temp_flags(**flags):
            ar = lv.map_async(f, range(k * 100, (k + 1) * 100), chunksize=1)
        batches.append((k, ar))
        prev = ar
    for k, ar in batches:
        assert list(ar.get(timeout=timeout)) == list(range(k * 100, (k + 1) * 100))
    for bad in fails:
        try:
            bad.get(timeout=timeout)
        except Exception:  # noqa: BLE001 (the planned failure)
            pass
        else:
            raise AssertionError("the failing task succeeded")
    return n + len(fails)


def rep(cluster, other, workload, n):
    rc = cluster.client
    lv = rc.load_balanced_view()
    H.clear_client_caches(rc)
    groups = {"controller": cluster.controller_procs(), "engines": cluster.engine_procs(),
              "client": [H.psutil.Process(os.getpid())], "other_cluster": other.all_procs()}
    s0 = H.CpuSnapshot(groups)
    t = time.perf_counter()
    timeout = max(10.0, min(600.0, H.remaining_alarm() - 5))
    tasks = n
    if workload == "plain":
        run_plain(lv, n, timeout)
    else:
        tasks = run_deps(lv, n, timeout)
    wall = time.perf_counter() - t
    cpu = s0.delta(H.CpuSnapshot(groups))
    return {"tasks_per_s": tasks / wall, "ctrl_cpu_s_per_1000": 1000 * cpu["controller"] / tasks,
            "wall_s": wall, "tasks": tasks, "foreign_pct": 100 * cpu["foreign"] / cpu["wall"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="1 rep of 500 tasks")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--px-binary", default=None)
    ap.add_argument("--timeout", type=float, default=3000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.quick:
        a.reps, a.tasks = 1, 500
    schemes = [s for s in a.schemes.split(",") if s]
    px = H.px_binary(a.px_binary)
    H.install_time_limit(a.timeout)
    print(f"machine: {H.machine_load()}")
    print(f"pxcontroller: {px}; {a.reps} rep(s) of {a.tasks} tasks per workload; schemes {schemes}")
    tmp = Path(tempfile.mkdtemp(prefix="pxbench-schemes-"))
    results = {}
    failed = False
    try:
        for scheme in schemes:
            clusters = {kind: SchemeCluster(kind, tmp / f"{scheme}-{kind}", 4, px, extra_args=[f"--scheme={scheme}"])
                        for kind in H.KINDS}
            try:
                deadline = time.monotonic() + 120
                for c in clusters.values():
                    c.start_controller(deadline)
                for c in clusters.values():
                    c.start_engines()
                for c in clusters.values():
                    c.connect(deadline)
                for c in clusters.values():  # warm-up
                    run_plain(c.client.load_balanced_view(), max(50, a.tasks // 10), 120)
                data = {w: {k: [] for k in H.KINDS} for w in WORKLOADS}
                for r in range(a.reps):
                    for wi, w in enumerate(WORKLOADS):
                        order = list(H.KINDS) if (r + wi) % 2 == 0 else list(reversed(H.KINDS))
                        for kind in order:
                            other = clusters["stock" if kind == "px" else "px"]
                            out = rep(clusters[kind], other, w, a.tasks)
                            data[w][kind].append(out)
                            print(f"{scheme:11s} {w:5s} rep {r + 1}/{a.reps} {H.LABEL[kind]:12s} "
                                  f"{out['tasks_per_s']:6.0f} tasks/s  ctrl CPU {out['ctrl_cpu_s_per_1000']:.3f} s/1000 "
                                  f"(foreign load {out['foreign_pct']:.0f}% of a core)", flush=True)
                results[scheme] = data
                if clusters["px"].px_stats():
                    results[scheme]["px_stats"] = clusters["px"].px_stats()
            finally:
                H.stop_clusters(list(clusters.values()))
    except Exception as e:  # noqa: BLE001
        failed = True
        print(f"benchmark failed: {e!r}", file=sys.stderr)

    print("\nmedian over reps        | tasks/s px  stock  ratio | ctrl CPU s/1000 px  stock  stock/px")
    summary = {}
    for scheme, data in results.items():
        for w in WORKLOADS:
            d = data[w]
            if not d["px"] or not d["stock"]:
                continue
            med = {k: {m: H.median(x[m] for x in d[k]) for m in ("tasks_per_s", "ctrl_cpu_s_per_1000")} for k in H.KINDS}
            ratio = med["px"]["tasks_per_s"] / med["stock"]["tasks_per_s"]
            cpu_ratio = med["stock"]["ctrl_cpu_s_per_1000"] / max(1e-9, med["px"]["ctrl_cpu_s_per_1000"])
            summary[f"{scheme}/{w}"] = {"px": med["px"], "stock": med["stock"], "throughput_ratio": ratio,
                                        "stock_cpu_over_px": cpu_ratio}
            print(f"{scheme:11s} {w:5s}       | {med['px']['tasks_per_s']:9.0f} {med['stock']['tasks_per_s']:6.0f} "
                  f"{ratio:5.2f}x | {med['px']['ctrl_cpu_s_per_1000']:18.3f} {med['stock']['ctrl_cpu_s_per_1000']:6.3f} "
                  f"{cpu_ratio:7.1f}x")
    goal = all(v["stock_cpu_over_px"] >= 10 for v in summary.values()) if summary else False
    print(f"\ngoal (>= 10x less controller CPU per task than stock, every scheme and workload): "
          f"{'met' if goal else 'NOT met'}")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(a.json) if a.json else HERE / "results" / f"schemes-{stamp}{'-quick' if a.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": vars(a), "px_binary": px, "machine": H.machine_load(0.2),
                                "raw": results, "summary": summary, "goal_met": goal}, indent=1, default=str))
    print(f"JSON: {path}")
    if not failed:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
