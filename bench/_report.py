"""Reports of the paired benchmarks: one number format, paired ratios and their verdicts, the
names of the two sides, and the tables of bench_controller.py and bench_engines.py.

Both benchmarks measure two sides rep by rep, interleaved: "px" (the pxfabric build under
test) and "stock" (stock ipyparallel). With ``--against-px`` the "stock" side is a second
pxfabric build instead (an older pxcontroller/pxengine) and the sides are called "new" and
"old"; the keys in the results stay "px" and "stock", ``res["sides"]`` holds the names. A ratio
is always "stock side / px side" for times and CPU and "px side / stock side" for rates, so
> 1 means the px side (the new build) is better.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import _harness as H

KINDS = H.KINDS  # ("px", "stock")
AGAINST_SIDES = {"px": "new", "stock": "old"}


def fmt(x, nd=2):
    """A number for a report table: 3 significant-ish digits, "-" for None."""
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{nd}f}"


def sides(default: Dict[str, str], against: bool) -> Dict[str, str]:
    """The two sides' names: ``default`` (e.g. pxcontroller / ipcontroller), or new / old when
    the stock side is a second pxfabric build (``--against-px``)."""
    return dict(AGAINST_SIDES) if against else dict(default)


def paired_ratio(px: Optional[float], stock: Optional[float], better: str) -> Optional[float]:
    """One rep's ratio, > 1 when the px side is better: stock/px if lower is better (times,
    CPU), px/stock if higher is (rates); None when either is missing or the divisor is 0."""
    if px is None or stock is None:
        return None
    if better == "lower":
        return stock / px if px > 0 else None
    return px / stock if stock > 0 else None


def paired_summary(ratios: Sequence[Optional[float]]) -> dict:
    """:func:`H.summary` of the paired ratios that exist, with the list itself as "reps"."""
    ratios = [r for r in ratios if r is not None]
    out = H.summary(ratios)
    out["reps"] = ratios
    return out


def judge(rp: dict, goal: float, parity: float) -> str:
    """The verdict on a paired median against ``goal`` (the minimum ratio; 1.0 = not worse,
    where a median within ``parity`` below 1 counts as parity)."""
    med, lo, hi = rp["median"], rp["min"], rp["max"]
    if med >= goal:
        return "MET" + (" (not in every rep)" if lo < goal else "")
    if goal == 1.0 and med >= parity:
        return f"PARITY (within {100 * (1 - parity):.0f}%)"
    if goal == 1.0:
        return "WORSE (within noise)" if hi >= 1.0 else "WORSE"
    return "NOT MET" + (" (worse than stock)" if med < 1.0 else "")


# ============================================================================ bench_controller

CONTROLLER_SIDES = H.LABEL  # {"px": "pxcontroller", "stock": "ipcontroller"}


def controller_analysis(reps_data: dict, workloads: Sequence[tuple]) -> dict:
    """reps_data[workload][kind] = list of rep dicts (index = rep); ``workloads`` as
    bench_controller.WORKLOADS: (name, "latency" or "rate", unit, description)."""
    out = {}
    for name, metric, unit, _ in workloads:
        d = reps_data.get(name)
        if not d or not d["px"] or not d["stock"]:
            continue
        row = {"unit": unit, "metric": metric}
        for kind in KINDS:
            row[kind] = _controller_side(d[kind], metric, name)
        n = min(len(d["px"]), len(d["stock"]))
        better = "lower" if metric == "latency" else "higher"
        paired = [paired_ratio(d["px"][i]["value"], d["stock"][i]["value"], better) for i in range(n)]
        row["speedup_paired"] = paired_summary(paired)
        row["speedup_of_medians"] = paired_ratio(row["px"]["median"], row["stock"]["median"], better)
        cp = [paired_ratio(d["px"][i]["cpu"]["controller"], d["stock"][i]["cpu"]["controller"],
                           "lower") for i in range(n)]
        cp = [x for x in cp if x is not None]
        row["ctrl_cpu_stock_over_px_paired"] = H.summary(cp) if cp else None
        out[name] = row
    return out


def _controller_side(reps: List[dict], metric: str, name: str) -> dict:
    """One side's reps of one workload: the values and the CPU of each process group."""
    vals = [r["value"] for r in reps]
    side = H.summary(vals)
    side["reps"] = vals
    per_op = [r["cpu"]["controller"] / r["ops"] for r in reps]
    side["ctrl_cpu_s_per_1000_ops"] = H.median(p * 1000 for p in per_op)
    side["ctrl_cpu_s_per_1000_ops_reps"] = [p * 1000 for p in per_op]
    side["ctrl_user_s_per_1000_ops"] = H.median(
        1000 * r["cpu"]["controller_user"] / r["ops"] for r in reps)
    side["ctrl_system_s_per_1000_ops"] = H.median(
        1000 * r["cpu"]["controller_system"] / r["ops"] for r in reps)
    for key, group in (("ctrl_cpu_pct_of_core", "controller"), ("engines_cpu_pct_of_core", "engines"),
                       ("client_cpu_pct_of_core", "client"),
                       ("idle_other_cluster_cpu_pct_of_core", "other_cluster"),
                       ("foreign_cpu_pct_of_core", "foreign")):
        side[key] = H.median(100 * r["cpu"][group] / r["cpu"]["wall"] for r in reps)
    if metric == "latency":
        side["all_calls"] = H.summary([x for r in reps for x in r["calls_ms"]])
    if name == "lb_apply":
        side["submit_s_reps"] = [r["submit_s"] for r in reps]
    return side


def controller_verdict(A: dict, against: bool = False) -> dict:
    """Goals: controller CPU per task <= 1/10 of stock's (not with --against-px: both sides are
    pxcontroller), and no workload slower (paired median < 1)."""
    lines = []
    ok_cpu = True
    L = sides(CONTROLLER_SIDES, against)
    for name in ("lb_map", "lb_apply"):
        r = A.get(name)
        if not r:
            continue
        s, p = r["stock"]["ctrl_cpu_s_per_1000_ops"], r["px"]["ctrl_cpu_s_per_1000_ops"]
        frac = p / s if s else float("inf")
        if against:
            lines.append(f"controller CPU, {name}: {L['px']} uses {100 * frac:.1f}% of {L['stock']} "
                         f"({s:.3f} vs {p:.3f} s/1000 tasks)")
            continue
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
    what = f"{L['px']} slower than {L['stock']}" if against else "workload slower"
    lines.append(f"goal no {what}: " + ("MET" if not slower else "NOT MET: " + "; ".join(slower)))
    return {"cpu_goal_met": None if against else ok_cpu, "no_slower_goal_met": not slower,
            "lines": lines}


def print_controller_report(res: dict, workloads: Sequence[tuple]) -> None:
    A = res["analysis"]
    cfg = res["config"]
    against = cfg.get("against", False)
    p, s = (AGAINST_SIDES["px"], AGAINST_SIDES["stock"]) if against else ("px", "stock")
    title = (f"new pxcontroller ({res['px_binary']['path']}) vs old ({res['against_binary']['path']})"
             if against else "pxcontroller vs stock ipcontroller")
    faster = "the new pxcontroller" if against else "pxcontroller"
    print()
    print(f"{title}, {cfg['engines']} stock engines each, {cfg['reps']} interleaved reps, "
          f"tasks={cfg['tasks']}, calls={cfg['calls']}")
    mb = res["machine"]["before"]
    print(f"machine before: {mb['ncpu']} cpus, busy {mb['cpu_busy_pct_1s']:.0f}% of all cores over 1 s, "
          f"loadavg {mb['loadavg_1_5_15']}")
    if "during" in res["machine"]:
        md = res["machine"]["during"]
        print(f"machine during reps: busy {md['busy_pct_of_all_cores']:.0f}% of all cores; "
              f"other users (not our processes) {md['foreign_pct_of_one_core']:.0f}% of one core")
    print()
    hdr = (f"{'workload':<16} {'unit':<8} {s:>8} {p:>8} {'speedup':>8} "
           f"{'paired (min..max)':>18} {s + ' reps min..max':>20} {p + ' reps min..max':>18}")
    print(hdr)
    print("-" * len(hdr))
    for name, metric, unit, _ in workloads:
        r = A.get(name)
        if not r:
            continue
        sp = r["speedup_paired"]
        print(f"{name:<16} {unit:<8} {fmt(r['stock']['median']):>8} {fmt(r['px']['median']):>8} "
              f"{fmt(sp['median']):>7}x {fmt(sp['min']) + '..' + fmt(sp['max']):>18} "
              f"{fmt(r['stock']['min']) + '..' + fmt(r['stock']['max']):>20} "
              f"{fmt(r['px']['min']) + '..' + fmt(r['px']['max']):>18}")
    print(f"speedup = median over reps of the paired ratio: {s}/{p} for ms/call, {p}/{s} for tasks/s "
          f"(>1 means {faster} is faster)")
    print()
    hdr2 = (f"{'controller CPU':<16} {s:>10} {p:>10} {s + '/' + p:>9} {p + ' % of ' + s:>14} "
            f"{s + ' %core':>11} {p + ' %core':>9} {p + ' usr/sys':>12}")
    print(hdr2)
    print("-" * len(hdr2))
    for name, metric, unit, _ in workloads:
        r = A.get(name)
        if not r:
            continue
        sv, pv = r["stock"]["ctrl_cpu_s_per_1000_ops"], r["px"]["ctrl_cpu_s_per_1000_ops"]
        per = "s/1000 tasks" if metric == "rate" else "s/1000 calls"
        ratio = sv / pv if pv else None
        print(f"{name:<16} {fmt(sv, 3):>10} {fmt(pv, 3):>10} {fmt(ratio):>8}x "
              f"{fmt(100 * pv / sv if sv else None, 1):>13}% {fmt(r['stock']['ctrl_cpu_pct_of_core'], 0):>10}% "
              f"{fmt(r['px']['ctrl_cpu_pct_of_core'], 0):>8}% "
              f"{fmt(r['px']['ctrl_user_s_per_1000_ops'], 2) + '/' + fmt(r['px']['ctrl_system_s_per_1000_ops'], 2):>12}"
              f"   ({per})")
    trees = "both: one process" if against else "stock: every process; px: one"
    print(f"controller CPU = user+system seconds of the controller's whole process tree "
          f"({trees}), median over reps; {p} usr/sys = its user and system parts")
    print()
    for line in res["verdict"]["lines"]:
        print(line)


# ============================================================================ bench_engines

ENGINES_SIDES = {"px": "pxfabric", "stock": "stock"}
# CPU times come in 10 ms ticks: over a 5 s window one tick is 0.2 % of a core. Idle-CPU
# ratios treat a difference of at most one tick as equal (ratio 1) and otherwise clamp both
# sides to one tick, so an idle process does not divide by zero.
CPU_TICK_S = 0.01
# "not worse" goals: a paired median within 5 % below 1 is reported as parity, not as worse
PARITY = 0.95
GOAL_TEXT = {3.0: ">= 3x better", 2.0: ">= 2x better", 1.0: "not worse"}


def engines_goal(goal: Optional[float], against: bool) -> Optional[float]:
    """A metric's goal: against stock as bench_engines.METRICS says; between two pxfabric
    builds (--against-px) every goal becomes "not worse"."""
    return 1.0 if against and goal is not None else goal


def engines_analysis(lifecycles: list, ns: list, metrics: Sequence[tuple],
                     against: bool = False) -> dict:
    """Per (metric, N): medians per kind over reps and the paired ratios (rep i vs rep i).
    ``metrics`` as bench_engines.METRICS: (name, workload, better, unit, what, goal)."""
    by = {}
    for lc in lifecycles:
        by.setdefault((lc["n"], lc["rep"], lc["kind"]), lc)
    out = {}
    for name, _, better, unit, _, goal in metrics:
        for n in ns:
            row = {"unit": unit, "better": better, "goal": engines_goal(goal, against)}
            for kind in KINDS:
                vals = [lc["metrics"][name] for (nn, _, k), lc in sorted(by.items())
                        if nn == n and k == kind and lc["metrics"].get(name) is not None]
                row[kind] = H.summary(vals)
                row[kind]["reps"] = vals
            paired = []
            for r in sorted({r for (nn, r, _) in by if nn == n}):
                s = by.get((n, r, "stock"), {}).get("metrics", {}).get(name)
                p = by.get((n, r, "px"), {}).get("metrics", {}).get(name)
                if s is None or p is None:
                    continue
                if unit.startswith("%core"):
                    tick = 100 * CPU_TICK_S / by[(n, r, "px")]["idle"]["window_s"]
                    if abs(s - p) <= tick + 1e-9:
                        s = p = 1.0
                    s, p = max(s, tick), max(p, tick)
                paired.append(paired_ratio(p, s, better))
            if not [x for x in paired if x is not None] and not row["px"]["n"] and not row["stock"]["n"]:
                continue
            row["ratio_paired"] = paired_summary(paired)
            out.setdefault(name, {})[str(n)] = row
    return out


def engines_ceiling(lifecycles: list, ns: list, ncpu: int, workloads: Sequence[str]) -> dict:
    """How far the unchanged client lets pxfabric get, per workload at the largest N.

    The stock client runs on the same cores and spends the same CPU whatever it talks to, so
    even a pxfabric whose processes took no CPU at all would not beat stock's wall time by
    more than stock wall / (px side's client CPU per call): the ceiling. The px side's total
    CPU per call over the machine's cores is a floor for its wall time on this machine."""
    top = max(ns)
    by = {(lc["n"], lc["rep"], lc["kind"]): lc for lc in lifecycles}
    out = {}
    for w in workloads:
        rows = []
        for r in sorted({r for (n, r, _) in by if n == top}):
            px, st = by.get((top, r, "px")), by.get((top, r, "stock"))
            if not px or not st or w not in px.get("cpu", {}) or not px["calls"].get(w) \
                    or not st["calls"].get(w):
                continue
            k = len(px["calls"][w])
            client_ms = px["cpu"][w]["client"] / k * 1e3
            machine_ms = px["cpu"][w]["machine"] / k * 1e3
            stock_wall = H.median(st["calls"][w])
            rows.append({"stock_wall_ms": stock_wall, "px_wall_ms": H.median(px["calls"][w]),
                         "px_client_cpu_ms": client_ms, "px_machine_cpu_ms": machine_ms,
                         "px_wall_floor_ms": machine_ms / ncpu,
                         "ceiling": stock_wall / client_ms if client_ms > 0 else None})
        if rows:
            out[w] = {"n": top, "reps": rows,
                      **{f"{key}_median": H.median([x[key] for x in rows if x[key] is not None])
                         for key in ("stock_wall_ms", "px_wall_ms", "px_client_cpu_ms",
                                     "px_machine_cpu_ms", "px_wall_floor_ms", "ceiling")}}
    return out


def print_engines_ceiling(C: dict, ncpu: int, against: bool = False) -> None:
    if not C:
        return
    p, s = (AGAINST_SIDES["px"], AGAINST_SIDES["stock"]) if against else ("px", "stock")
    print()
    print(f"what the client leaves (N={next(iter(C.values()))['n']}, medians over reps; CPU per call "
          f"of the {p} side's processes):")
    print(f"{'workload':<16} {s + ' wall':>10} {p + ' wall':>8} {'client CPU':>10} {'all CPU':>8} "
          f"{'all CPU/' + str(ncpu):>9} {'ceiling':>8}")
    for w, c in C.items():
        print(f"{w:<16} {fmt(c['stock_wall_ms_median']):>10} {fmt(c['px_wall_ms_median']):>8} "
              f"{fmt(c['px_client_cpu_ms_median']):>10} {fmt(c['px_machine_cpu_ms_median']):>8} "
              f"{fmt(c['px_wall_floor_ms_median']):>9} {fmt(c['ceiling_median']):>7}x")
    who = "the new pxfabric" if against else "pxfabric"
    print(f"ceiling = {s} wall / the stock client's own CPU per call on the {p} side: the best "
          f"ratio possible if {who}'s processes took no CPU at all (the client shares the cores). "
          f"all CPU/cores: a floor for {p}'s wall time at the CPU the {p} side spent.")


def engines_verdict(A: dict, ns: list, metrics: Sequence[tuple], against: bool = False) -> dict:
    """Goals at the largest N (the issue's N=8), plus 'nothing worse' at every N."""
    top = str(max(ns))
    L = sides(ENGINES_SIDES, against)
    rows = {}
    lines = []
    for name, _, _, _, what, goal in metrics:
        goal = engines_goal(goal, against)
        if goal is None or name not in A or top not in A[name]:
            continue
        rp = A[name][top].get("ratio_paired", {})
        if not rp.get("n"):
            rows[name] = "NO DATA"
            continue
        v = judge(rp, goal, PARITY)
        rows[name] = v
        lines.append(f"goal at N={top}: {name:<20} {GOAL_TEXT[goal]:<13} paired {fmt(rp['median'])}x "
                     f"({fmt(rp['min'])}..{fmt(rp['max'])}) -> {v}")
    goal_of = {m[0]: m[5] for m in metrics}
    worse = []
    for name, per_n in A.items():
        if goal_of[name] is None:
            continue
        for n, row in per_n.items():
            rp = row.get("ratio_paired", {})
            if rp.get("n") and rp["median"] < PARITY:
                noise = "within noise" if rp["max"] >= 1.0 else "worse in every rep"
                worse.append(f"{name}@N={n} {fmt(rp['median'])}x ({noise})")
    lines.append(f"nothing worse than {L['stock']} (paired median < {PARITY}) at any N: "
                 + ("yes" if not worse else "NO: " + "; ".join(worse)))
    return {"at_n": int(top), "rows": rows, "worse_anywhere": worse, "lines": lines}


def print_engines_report(res: dict, metrics: Sequence[tuple]) -> None:
    A, V = res["analysis"], res["verdict"]
    cfg = res["config"]
    against = cfg.get("against", False)
    L = sides(ENGINES_SIDES, against)
    new, old = L["px"], L["stock"]
    p, s = (new, old) if against else ("px", "stock")
    top = str(V["at_n"])
    print()
    what = {"px": "pxcontroller + mpiexec pxengine",
            "stock": ("an older pxcontroller + mpiexec pxengine" if against
                      else "ipcontroller + mpiexec ipyparallel.engine --mpi")}
    print(f"{new} ({what['px']}) vs {old} ({what['stock']}), N={cfg['ns']}, {cfg['reps']} interleaved "
          f"reps, {cfg['calls']} calls/latency rep, {cfg['pushes']} pushes of {cfg['push_mb']} MB, "
          f"{cfg['scatters']} scatter+gather of {cfg['scatter_n']:,} int64, {cfg['tasks']} tasks")
    print(f"machine: {res['machine']['before']['ncpu']} cores; N=4 is 2x and N=8 4x oversubscribed "
          f"(rank counts honest: one process per rank)")
    mb, ma = res["machine"]["before"], res["machine"].get("after", {})
    print(f"machine load before: busy {mb['cpu_busy_pct_1s']:.0f}% of all cores, loadavg "
          f"{mb['loadavg_1_5_15']}; after: {ma.get('cpu_busy_pct_1s', '-')}% loadavg "
          f"{ma.get('loadavg_1_5_15', '-')}")
    if "during" in res["machine"]:
        md = res["machine"]["during"]
        print(f"during: other users' load (not our processes) median {md['foreign_pct_of_one_core_median']:.0f}% "
              f"of one core per cluster lifetime (max {md['foreign_pct_of_one_core_max']:.0f}%)")
    print()
    hdr = (f"{'metric':<20} {'N':>2} {'unit':<10} {s:>8} {p:>8} {'ratio':>7} {'pairs':>5} "
           f"{'paired min..max':>16} {s + ' min..max':>16} {p + ' min..max':>16}  verdict (N={top})")
    print(hdr)
    print("-" * len(hdr))
    for name, _, better, unit, _, goal in metrics:
        if name not in A:
            continue
        goal = engines_goal(goal, against)
        for n in sorted(A[name], key=int):
            r = A[name][n]
            rp = r.get("ratio_paired", {})
            v = ""
            if n == top and goal is not None:
                v = f"{GOAL_TEXT[goal]}: {V['rows'].get(name, '-')}"
            print(f"{name:<20} {n:>2} {unit:<10} {fmt(r['stock'].get('median')):>8} "
                  f"{fmt(r['px'].get('median')):>8} {fmt(rp.get('median')):>6}x {rp.get('n', 0):>5} "
                  f"{fmt(rp.get('min')) + '..' + fmt(rp.get('max')):>16} "
                  f"{fmt(r['stock'].get('min')) + '..' + fmt(r['stock'].get('max')):>16} "
                  f"{fmt(r['px'].get('min')) + '..' + fmt(r['px'].get('max')):>16}  {v}")
    print(f"ratio = median over reps of the paired ratio (rep i of {s} vs rep i of {p}, run back to "
          f"back): {s}/{p} for times and CPU, {p}/{s} for tasks/s. >1 means {new} is better. "
          "Idle CPU: a difference of one 10 ms tick over the window or less counts as equal.")
    print()
    for line in V["lines"]:
        print(line)
    print_engines_ceiling(res.get("ceiling", {}), res["machine"]["before"]["ncpu"], against)
