"""Start-up on Slurm: ``pxcluster start --slurm -n 8`` against ipyparallel's
``ipcluster start -n 8 --engines=Slurm``, on the same real (private) Slurm, paired trials.

What is timed is what a user waits for: from typing the command until all N engines are
registered with the controller.

* **px** (pxfabric): ``/usr/bin/python3 -m pxfabric start -n N --slurm --timeout 120`` with
  ``PYTHONPATH=<repo>/python`` and a fresh ``IPYTHONDIR``. It submits one batch job
  (``slurm/pxfabric.sbatch``: pxcontroller on the job's node, then ``srun --mpi=pmix
  pxengine``, one MPI job of N ranks) and exits 0 once N engines are registered; timed from
  launching the command to its exit. Then ``python3 -m pxfabric stop`` (not timed).
* **stock_mpi** (the issue's "MPI engines"): ``ipcluster start -n N --engines=Slurm
  --daemonize --cluster-id=ID`` with ipyparallel 7.1's ``SlurmEngineSetLauncher`` whose
  template is its default one but for ``srun --mpi=pmix {program_and_args} --mpi``: one batch
  job of N ``ipengine --mpi`` processes that are the ranks of one MPI job (each imports
  mpi4py, engine id = rank: checked after the first trial). The stock ipcontroller runs
  locally (ipcluster's default controller launcher), as it does on a login node. Timed from
  launching ``ipcluster`` until a stock ``Client`` (polling for the connection file from the
  start, then ``rc.wait_for_engines(N)``) sees N engines. Then ``ipcluster stop`` (not timed).
* **stock** (diagnostic, ``--variants``): the same with the launcher's default template,
  ``srun {program_and_args}`` (N separate engines, no MPI).
* **stock_mpi_ping250** (diagnostic): stock_mpi with ``--ping=250`` for the stock controller
  (stock completes a registration at the engine's first heartbeat: how much of its time that is).

Both sides get the controllers' defaults (heartbeat 3000 ms; stock completes a registration at
the engine's first heartbeat, pxcontroller pings a registering engine at once), the same
Slurm instance (``tests/integration/slurm.py``: ``make_slurm()``, single node, 8 CPUs claimed,
``sched/builtin``) and the same Open MPI environment (root, oversubscribed, yield when idle:
**the machine has 2 cores for 8 ranks**). Trials alternate the sides (order flipped every
trial); before each trial the queue must be empty, after each every job is gone
(``squeue``), and the Slurm daemons are stopped in a ``finally``.

Where the time goes is read from the logs, all on one clock (wall time, this machine):
slurmctld (submitted, allocated), slurmd (batch script launched, step ``.0`` launched), the
controller's log (listening, each engine registered) and, for px, the times pxcluster printed
its lines.

    /usr/bin/python3 bench/bench_slurm.py [--trials 5] [-n 8] [--variants px,stock_mpi,stock]

Results: a table on stdout and JSON in ``bench/results/slurm-<UTC>.json``; ``--report JSON``
reprints a saved run. Needs root (the private Slurm runs its daemons as root).
"""

from __future__ import annotations

import argparse
import calendar
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil

import _harness as H
import _report as R

HERE = Path(__file__).resolve().parent
REPO = H.REPO
PYTHON = H.PYTHON
STOP_TIMEOUT = 60.0        # a stop (pxcluster stop / ipcluster stop) and the queue emptying

# ipyparallel 7.1's SlurmEngineSetLauncher.default_template with the job array (--ntasks)
# line it inserts, and the srun line made an MPI job of `ipengine --mpi` (what its MPI
# launcher runs under mpiexec).
STOCK_MPI_TEMPLATE = """#!/bin/sh
#SBATCH --ntasks={n}
#SBATCH --job-name=ipy-engine-{cluster_id}
srun --mpi=pmix {program_and_args} --mpi
"""

VARIANTS = {
    "px": "pxcluster start -n N --slurm (pxcontroller + srun --mpi=pmix pxengine, one job)",
    "stock_mpi": "ipcluster start -n N --engines=Slurm, template srun --mpi=pmix ipengine --mpi",
    "stock": "ipcluster start -n N --engines=Slurm, default template (srun ipengine)",
    "stock_mpi_ping250": "stock_mpi with the stock controller's heartbeat at 250 ms "
                         "(ipcluster ... -- --ping=250)",
}

_TS = re.compile(r"^\[?(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d(?:\.\d+)?)")


def wall_of(line: str) -> Optional[float]:
    """The wall time (epoch seconds) a log line starts with: Slurm's ``[2026-12-03T17:55:30.147]``,
    pxcontroller's ``2026-12-03T17:55:30.147``, ipyparallel's ``2026-12-03 17:55:30.147``.
    All are UTC on this machine (TZ is UTC; checked in ``main``)."""
    m = _TS.match(line)
    if not m:
        return None
    day, clock = m.group(1), m.group(2)
    whole, _, frac = clock.partition(".")
    t = calendar.timegm(time.strptime(f"{day} {whole}", "%Y-%m-%d %H:%M:%S"))
    return t + (float("0." + frac) if frac else 0.0)


def first_match(path: Path, pattern: str) -> Optional[float]:
    """Wall time of the first line of ``path`` matching ``pattern``."""
    rx = re.compile(pattern)
    try:
        for line in path.read_text(errors="replace").splitlines():
            if rx.search(line):
                return wall_of(line)
    except OSError:
        pass
    return None


def all_matches(path: Path, pattern: str) -> List[float]:
    rx = re.compile(pattern)
    try:
        return [t for line in path.read_text(errors="replace").splitlines()
                if rx.search(line) and (t := wall_of(line)) is not None]
    except OSError:
        return []


def slurm_events(slurm, job: str) -> Dict[str, Optional[float]]:
    """What Slurm's own logs say about ``job``: submitted, allocated (slurmctld), batch script
    launched and step .0 launched (slurmd)."""
    ctld = slurm.ctld_log
    sd = slurm.slurmd_log(slurm.node_names[0])
    j = re.escape(job)
    return {
        "submitted": first_match(ctld, rf"_slurm_rpc_submit_batch_job: JobId={j}\b"),
        "allocated": first_match(ctld, rf"[Aa]llocate JobId={j}\b"),
        "batch_launched": first_match(sd, rf"[Ll]aunching batch job {j}\b"),
        "step_launched": first_match(sd, rf"launch task StepId={j}\.0\b"),
    }


# ----------------------------------------------------------------------------- the queue

def wait_queue_empty(slurm, timeout: float = STOP_TIMEOUT) -> List[dict]:
    """Wait until squeue shows nothing (completing jobs included); what is left at the end."""
    deadline = time.monotonic() + timeout
    left = slurm.squeue()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = slurm.squeue()
    return left


def ensure_clean(slurm, where: str) -> Optional[str]:
    """Before and after each trial: the queue must be empty. Anything left is cancelled
    (and reported in the trial's record)."""
    left = wait_queue_empty(slurm, timeout=STOP_TIMEOUT)
    if not left:
        return None
    msg = f"{where}: jobs left in the queue {left}; scancel'd"
    slurm.cancel_all(timeout=STOP_TIMEOUT)
    return msg


def stop_pids(pids: List[int], grace: float = 10.0) -> List[int]:
    """SIGTERM then SIGKILL these PIDs (ours: recorded when we started them); the ones that
    needed SIGKILL."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return H.stop_procs(procs, grace)


# ----------------------------------------------------------------------------- trials

def px_trial(slurm, base_env: dict, tmp: Path, n: int, k: int, timeout: float) -> dict:
    """One ``pxcluster start --slurm`` timed from launch to exit 0, then ``pxcluster stop``."""
    ipydir = tmp / f"trial{k}-px" / "ipython"
    ipydir.mkdir(parents=True)
    env = {**base_env, "IPYTHONDIR": str(ipydir)}
    argv = [PYTHON, "-m", "pxfabric", "start", "-n", str(n), "--slurm", "--timeout", "120"]
    rec: dict = {"variant": "px", "trial": k, "argv": argv, "ipythondir": str(ipydir)}
    lines: List[tuple] = []
    w0 = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=str(ipydir.parent), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:   # each line with the time pxcluster printed it
            lines.append((round(time.perf_counter() - t0, 3), line.rstrip("\n")))
        rc = proc.wait(timeout=timeout)
    except BaseException:
        stop_pids([proc.pid])
        raise
    t_exit = time.perf_counter() - t0
    rec.update(rc=rc, ready_s=t_exit if rc == 0 else None, wall_start=w0, output=lines)
    for _, line in lines:
        m = re.search(r"registered in ([\d.]+) s", line)
        if m:
            rec["registered_in_s"] = float(m.group(1))
        m = re.search(r"submitted job (\d+)", line)
        if m:
            rec["job"] = m.group(1)
    rec["printed"] = {
        "submitted": next((t for t, l in lines if "submitted job" in l), None),
        "running": next((t for t, l in lines if " running on " in l), None),
        "ready": next((t for t, l in lines if "registered in" in l), None),
    }
    logdir = ipydir / "profile_default" / "log"
    job = rec.get("job")
    if job:
        ev = slurm_events(slurm, job)
        ctl = logdir / f"pxcontroller-{job}.log"
        ev["controller_first_line"] = first_match(ctl, r".")
        ev["controller_listening"] = first_match(ctl, r"(?i)listening|connection info|writing")
        regs = all_matches(ctl, r"engine::engine \d+ .* registered")
        ev["first_engine_registered"] = min(regs) if regs else None
        ev["last_engine_registered"] = max(regs) if regs else None
        eng = logdir / f"pxengines-{job}.log"
        # rank 0 asks for all N engines at once, after MPI_Init and every rank's start-up
        up = first_match(eng, r"gateway: registering \d+ engines")
        ev["engines_up"] = ev["last_registration_request"] = up
        rec["events"] = {k2: (round(v - w0, 3) if isinstance(v, float) else v)
                         for k2, v in ev.items()}
        rec["controller_log"] = H.log_problems(ctl)
        rec["engine_log"] = H.log_problems(eng)
        rec["job_output"] = H.log_tail(logdir / f"pxslurm-default-{job}.out", 30)
    # stop (not timed)
    t_s = time.perf_counter()
    r = subprocess.run([PYTHON, "-m", "pxfabric", "stop"], env=env, capture_output=True,
                       text=True, timeout=STOP_TIMEOUT + 30)
    rec["stop"] = {"rc": r.returncode, "s": round(time.perf_counter() - t_s, 2),
                   "output": (r.stdout + r.stderr).strip()[-500:]}
    return rec


def stock_trial(slurm, base_env: dict, tmp: Path, n: int, k: int, timeout: float,
                mpi: bool, ping250: bool = False) -> dict:
    """One ``ipcluster start --engines=Slurm --daemonize`` timed from launch until a stock
    Client sees N engines, then ``ipcluster stop``."""
    import ipyparallel as ipp

    variant = ("stock_mpi_ping250" if ping250 else "stock_mpi") if mpi else "stock"
    cwd = tmp / f"trial{k}-{variant}"     # SlurmEngineSetLauncher writes slurm_engine.sbatch here
    ipydir = cwd / "ipython"
    ipydir.mkdir(parents=True)
    env = {**base_env, "IPYTHONDIR": str(ipydir)}
    cid = f"bench{k}{'mpi' if mpi else ''}{'ping' if ping250 else ''}"
    argv = ["ipcluster", "start", "-n", str(n), "--engines=Slurm", "--daemonize",
            f"--cluster-id={cid}"]
    if mpi:
        argv.append(f"--SlurmEngineSetLauncher.batch_template={STOCK_MPI_TEMPLATE}")
    if ping250:
        argv += ["--", "--ping=250"]   # ipcluster passes what follows `--` to ipcontroller
    pdir = ipydir / "profile_default"
    client_file = pdir / "security" / f"ipcontroller-{cid}-client.json"
    cluster_file = pdir / "security" / f"cluster-{cid}.json"
    rec: dict = {"variant": variant, "trial": k, "argv": argv, "ipythondir": str(ipydir),
                 "cluster_id": cid}
    rc = None
    w0 = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out_lines: List[str] = []
    reader = threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = t0 + timeout
    try:
        # the client polls for the connection file from the start, then waits for N engines
        while True:
            if client_file.exists():
                try:
                    json.loads(client_file.read_text())
                    break
                except ValueError:
                    pass   # being written
            if time.perf_counter() > deadline:
                raise H.HarnessError(f"no {client_file} after {timeout:.0f}s")
            time.sleep(0.02)
        rec["client_file_s"] = round(time.perf_counter() - t0, 3)
        rc = ipp.Client(str(client_file))
        rc.wait_for_engines(n, timeout=max(1.0, deadline - time.perf_counter()))
        rec["ready_s"] = time.perf_counter() - t0
        if k == 0 and mpi:  # what the engines are (MPI ranks or separate processes)
            rec["engine_check"] = rc[:].apply_sync(_engine_identity)
    except Exception as e:  # noqa: BLE001 - recorded; the trial still cleans up
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        if rc is not None:
            rc.close()
        try:
            proc.wait(timeout=30)   # --daemonize: the starter exits once the engines are submitted
        except subprocess.TimeoutExpired:
            stop_pids([proc.pid])
        reader.join(timeout=5)
        rec["ipcluster_rc"] = proc.returncode
        rec["ipcluster_output"] = "".join(out_lines)[-2000:]
        try:
            cluster_state = json.loads(cluster_file.read_text())
        except (OSError, ValueError):
            cluster_state = {}
        job = str((cluster_state.get("engines") or {}).get("sets", {}) and
                  next(iter(cluster_state["engines"]["sets"].values())).get("job_id", "") or "")
        ctl_pid = (cluster_state.get("controller") or {}).get("state", {}).get("pid")
        rec["job"] = job or None
        rec["controller_pid"] = ctl_pid
        logs = sorted((pdir / "log").glob(f"ipcontroller-{cid}-*.log"))
        ctl_text = logs[0].read_text(errors="replace") if logs else ""
        ctl_copy = cwd / "ipcontroller.log"     # `ipcluster stop` removes the profile's logs
        ctl_copy.write_text(ctl_text)
        t_s = time.perf_counter()
        r = subprocess.run(["ipcluster", "stop", f"--cluster-id={cid}"], env=env, cwd=str(cwd),
                           capture_output=True, text=True, timeout=STOP_TIMEOUT + 30)
        rec["stop"] = {"rc": r.returncode, "s": round(time.perf_counter() - t_s, 2),
                       "output": (r.stdout + r.stderr).strip()[-500:]}
        if ctl_pid and psutil.pid_exists(ctl_pid):
            # ipcluster stop leaves a controller only if it failed; ours, stopped by its PID
            rec["stop"]["controller_needed_kill"] = stop_pids([ctl_pid])
    ctl = ctl_copy
    eng = cwd / f"slurm-{job}.out"
    ev = slurm_events(slurm, job) if job else {}
    # each engine logs "log level" once its Python is up and ipyparallel imported
    ups = all_matches(eng, r"\[IPEngine[^]]*\] log level")
    ev["engines_up"] = max(ups) if len(ups) >= n else None
    ev["first_engine_up"] = min(ups) if ups else None
    reqs = all_matches(eng, r"Registering with controller")
    ev["last_registration_request"] = max(reqs) if len(reqs) >= n else None
    ev["ipcluster_first_line"] = first_match(ctl, r"IPClusterStart")
    ev["controller_listening"] = first_match(ctl, r"Hub listening")
    ev["controller_files"] = first_match(ctl, r"writing connection info")
    ev["engines_submitted"] = first_match(ctl, r"Job submitted with job id")
    regs = all_matches(ctl, r"registration::finished registering engine")
    ev["first_engine_registered"] = min(regs) if regs else None
    ev["last_engine_registered"] = max(regs) if regs else None
    rec["events"] = {k2: (round(v - w0, 3) if isinstance(v, float) else v) for k2, v in ev.items()}
    rec["controller_log"] = H.log_problems(ctl)
    if job:
        rec["engine_log"] = H.log_problems(eng,
                                           extra_benign=r"Debugger warning|frozen modules")
    return rec


def _engine_identity():
    import os
    import sys
    mpi = sys.modules.get("mpi4py.MPI")
    return {"pid": os.getpid(), "mpi_rank": mpi.COMM_WORLD.Get_rank() if mpi else None,
            "mpi_size": mpi.COMM_WORLD.Get_size() if mpi else None}


# ----------------------------------------------------------------------------- analysis

STEPS = (  # (label, from event, to event): the phases of a start-up, seconds
    ("launch -> sbatch accepted", None, "submitted"),
    ("submitted -> allocated", "submitted", "allocated"),
    ("allocated -> batch script started", "allocated", "batch_launched"),
    ("batch script -> srun step launched", "batch_launched", "step_launched"),
    ("step -> all engines up (MPI_Init, Python, imports)", "step_launched", "engines_up"),
    ("engines up -> last registration request", "engines_up", "last_registration_request"),
    ("last request -> last engine registered", "last_registration_request", "last_engine_registered"),
    ("last registered -> ready (command exit / Client sees N)", "last_engine_registered", "ready"),
)


def phases(rec: dict) -> Dict[str, Optional[float]]:
    ev = dict(rec.get("events") or {})
    ev["ready"] = rec.get("ready_s")
    out = {}
    for label, a, b in STEPS:
        ta = 0.0 if a is None else ev.get(a)
        tb = ev.get(b)
        out[label] = (tb - ta) if isinstance(ta, (int, float)) and isinstance(tb, (int, float)) else None
    return out


def analyse(trials: List[dict], variants: List[str]) -> dict:
    by = {v: [t for t in trials if t["variant"] == v] for v in variants}
    res: dict = {"per_variant": {}, "pairs": {}}
    for v, ts in by.items():
        ok = [t["ready_s"] for t in ts if t.get("ready_s") is not None]
        ph = {label: H.median([p for t in ts if (p := phases(t)[label]) is not None])
              for label, _, _ in STEPS}
        res["per_variant"][v] = {"ready": H.summary(ok), "phases": ph,
                                 "failed": [t["trial"] for t in ts if t.get("ready_s") is None]}
    if "px" in by:
        px = {t["trial"]: t.get("ready_s") for t in by["px"]}
        for v in variants:
            if v == "px":
                continue
            st = {t["trial"]: t.get("ready_s") for t in by[v]}
            ratios = [st[k] / px[k] for k in sorted(px) if px.get(k) and st.get(k)]
            ms, mp = res["per_variant"][v]["ready"].get("median"), res["per_variant"]["px"]["ready"].get("median")
            res["pairs"][v] = {"paired_ratios": ratios, "paired_median": H.median(ratios),
                               "paired_min": min(ratios) if ratios else None,
                               "paired_max": max(ratios) if ratios else None,
                               "ratio_of_medians": (ms / mp) if ms and mp else None}
    return res


def print_report(res: dict) -> None:
    cfg = res["config"]
    variants = cfg["variants"]
    A = res["analysis"]
    print()
    print(f"== start-up on Slurm, n={cfg['n']}, {cfg['trials']} paired trials "
          f"(one private Slurm {res.get('slurm', {}).get('version', '')}, single node, "
          f"{res['machine']['ncpu']} cores: oversubscribed, Open MPI yield_when_idle)")
    for v in variants:
        print(f"  {v:<9} {VARIANTS[v]}")
    print()
    w = {v: max(12, len(v) + 4) for v in variants}   # column widths
    hdr = f"{'trial':<6}" + "".join(f"{v + ' s':>{w[v]}}" for v in variants) + "   order (loadavg 1 min before each)"
    print(hdr)
    print("-" * len(hdr))
    for k in range(cfg["trials"]):
        row = {t["variant"]: t for t in res["trials"] if t["trial"] == k}
        order = " ".join(f"{t['variant']} ({R.fmt((t.get('loadavg_before') or [None])[0], 1)})"
                         for t in res["trials"] if t["trial"] == k)
        print(f"{k + 1:<6}" + "".join(f"{R.fmt(row.get(v, {}).get('ready_s')):>{w[v]}}" for v in variants)
              + f"   {order}")
    print("-" * len(hdr))
    print(f"{'median':<6}" + "".join(f"{R.fmt(A['per_variant'][v]['ready'].get('median')):>{w[v]}}"
                                    for v in variants))
    print(f"{'min':<6}" + "".join(f"{R.fmt(A['per_variant'][v]['ready'].get('min')):>{w[v]}}" for v in variants))
    print(f"{'max':<6}" + "".join(f"{R.fmt(A['per_variant'][v]['ready'].get('max')):>{w[v]}}" for v in variants))
    pxreg = [t.get("registered_in_s") for t in res["trials"] if t["variant"] == "px"]
    print(f"px: pxcluster's own 'registered in X s' (from sbatch accepted): "
          f"{' '.join(R.fmt(x) for x in pxreg)}; median {R.fmt(H.median([x for x in pxreg if x]))}")
    print()
    for v, P in A["pairs"].items():
        goal = "  goal >= 3x: " + ("MET" if (P["paired_median"] or 0) >= 3 else "not met") \
            if v == "stock_mpi" else ""
        print(f"{v} / px: ratio of medians {R.fmt(P['ratio_of_medians'])}x, median of paired ratios "
              f"{R.fmt(P['paired_median'])}x ({R.fmt(P['paired_min'])}..{R.fmt(P['paired_max'])}; "
              f"per trial {' '.join(R.fmt(r) for r in P['paired_ratios'])}){goal}")
    print()
    print("where the time goes (median over trials, s; wall clock from the command's launch, "
          "read from slurmctld/slurmd/controller logs):")
    hdr = f"{'phase':<58}" + "".join(f"{v:>{w[v]}}" for v in variants)
    print(hdr)
    print("-" * len(hdr))
    for label, _, _ in STEPS:
        print(f"{label:<58}" + "".join(f"{R.fmt(A['per_variant'][v]['phases'].get(label)):>{w[v]}}"
                                       for v in variants))
    print()
    for t in res["trials"]:
        if t.get("error") or t.get("rc"):
            print(f"trial {t['trial'] + 1} {t['variant']}: error {t.get('error') or t.get('rc')}")
    chk = next((t.get("engine_check") for t in res["trials"]
                if t["variant"] == "stock_mpi" and t.get("engine_check")), None)
    if chk:
        print(f"stock_mpi engines (trial 1): MPI ranks {[c['mpi_rank'] for c in chk]} of size "
              f"{chk[0]['mpi_size']}")
    for v in variants:
        n_c = sum(t.get("controller_log", {}).get("count", 0) for t in res["trials"] if t["variant"] == v)
        n_e = sum(t.get("engine_log", {}).get("count", 0) for t in res["trials"] if t["variant"] == v)
        print(f"{v} logs: {n_c} controller and {n_e} engine warning/error lines")
    left = [t.get("queue_after") for t in res["trials"] if t.get("queue_after")]
    print("clean-up: " + ("the queue was empty after every trial" if not left else f"LEFT: {left}"))
    if "run_wall_s" in res:
        print(f"run took {res['run_wall_s'] / 60:.1f} min")


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5, help="paired trials (default 5)")
    ap.add_argument("-n", type=int, default=8, help="engines (MPI ranks) per cluster (default 8)")
    ap.add_argument("--variants", default="px,stock_mpi",
                    help="comma list of " + ",".join(VARIANTS) + " (default px,stock_mpi)")
    ap.add_argument("--trial-timeout", type=float, default=150.0, help="limit for one start-up, s")
    ap.add_argument("--timeout", type=float, default=1500.0, help="hard limit for the whole run, s")
    ap.add_argument("--json", default=None, help="default bench/results/slurm-<UTC>.json")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (profiles, logs)")
    ap.add_argument("--report", metavar="JSON", help="run nothing: reprint a saved run")
    a = ap.parse_args()
    if a.report:
        res = json.loads(Path(a.report).read_text())
        res["analysis"] = analyse(res["trials"], res["config"]["variants"])
        print_report(res)
        return 0
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"unknown variants {bad} (choose from {','.join(VARIANTS)})")
    if a.trials < 1 or a.n < 1:
        ap.error("--trials and -n must be at least 1")
    if time.localtime().tm_gmtoff != 0:
        ap.error("the logs are read as UTC: run with TZ=UTC")

    H.install_time_limit(a.timeout)
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    import slurm as slurmmod  # tests/integration/slurm.py
    import ipyparallel
    import zmq

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.json) if a.json else HERE / "results" / f"slurm-{stamp}.json"
    tmp = Path(tempfile.mkdtemp(prefix="pxbench-slurm-"))
    # Snapshot what pxfabric runs (PXF_CONTROLLER/PXF_ENGINE, which pxcluster and the job
    # script honour): a rebuild of build/bin during the run must not mix builds.
    snap = tmp / "snapshot"
    snap.mkdir()
    binaries = {}
    for name, path in (("pxcontroller", H.px_binary(None)), ("pxengine", H.pxengine_binary(None))):
        binaries[name] = H.binary_info(path)
        binaries[name]["snapshot"] = str(shutil.copy2(path, snap / name))
    res: dict = {
        "bench": "slurm", "started_utc": stamp,
        "config": {"trials": a.trials, "n": a.n, "variants": variants, "tmp": str(tmp),
                   "stock_mpi_template": STOCK_MPI_TEMPLATE},
        "binaries": binaries, "variants": {v: VARIANTS[v] for v in variants},
        "mpi_env": H.MPI_ENV,
        "versions": {"python": platform.python_version(), "ipyparallel": ipyparallel.__version__,
                     "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()},
        "machine": {"ncpu": os.cpu_count()},
        "trials": [],
    }
    slurm = None
    t_all = time.perf_counter()
    rc_exit = 1
    try:
        t_s = time.perf_counter()
        try:
            slurm = slurmmod.make_slurm()
        except slurmmod.SlurmUnavailable as e:
            print(f"bench_slurm: no private Slurm here: {e}", file=sys.stderr)
            return 2
        ver = slurm.run(["sinfo", "--version"])
        res["slurm"] = {"version": ver.stdout.strip(), "setup_s": round(time.perf_counter() - t_s, 1),
                        "nodes": slurm.node_names, "cpus_claimed": slurm.cpus}
        base_env = {**os.environ, **slurm.env, **H.MPI_ENV,
                    "PYTHONPATH": str(REPO / "python"), "PYTHONDONTWRITEBYTECODE": "1",
                    "PXF_CONTROLLER": binaries["pxcontroller"]["snapshot"],
                    "PXF_ENGINE": binaries["pxengine"]["snapshot"]}
        base_env.pop("IPP_PROFILE_DIR", None)
        base_env.pop("IPP_CLUSTER_ID", None)
        print(f"bench_slurm: {a.trials} trials, n={a.n}, variants {variants}; "
              f"{res['slurm']['version']} up in {res['slurm']['setup_s']} s; "
              f"{os.cpu_count()} cores", flush=True)
        for k in range(a.trials):
            order = variants if k % 2 == 0 else list(reversed(variants))
            for v in order:
                before = ensure_clean(slurm, f"before trial {k + 1} {v}")
                time.sleep(1.0)   # let the previous cluster's exit settle (CPU, sockets)
                load_before = os.getloadavg()
                if v == "px":
                    rec = px_trial(slurm, base_env, tmp, a.n, k, a.trial_timeout)
                else:
                    rec = stock_trial(slurm, base_env, tmp, a.n, k, a.trial_timeout,
                                      mpi=v.startswith("stock_mpi"),
                                      ping250=(v == "stock_mpi_ping250"))
                rec["queue_before"] = before
                rec["loadavg_before"] = load_before
                rec["queue_after"] = ensure_clean(slurm, f"after trial {k + 1} {v}")
                res["trials"].append(rec)
                print(f"  trial {k + 1} {v:<9} ready {R.fmt(rec.get('ready_s'))} s"
                      + (f" (pxcluster: registered in {rec.get('registered_in_s')} s)"
                         if v == "px" else "")
                      + (f"  ERROR {rec.get('error') or rec.get('rc')}"
                         if rec.get("error") or rec.get("rc") else ""), flush=True)
        rc_exit = 0
    except BaseException as e:  # noqa: BLE001 (timeouts, ^C, SIGTERM)
        print(f"bench_slurm: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        rc_exit = 1
    finally:
        signal.alarm(0)
        if slurm is not None:
            try:
                slurm.cancel_all(timeout=STOP_TIMEOUT)
            finally:
                slurm.close()
        res["run_wall_s"] = time.perf_counter() - t_all
        if res["trials"]:
            res["analysis"] = analyse(res["trials"], variants)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=1, sort_keys=True, default=str) + "\n")
            print_report(res)
            print(f"JSON: {out}")
        if a.keep or rc_exit:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc_exit


if __name__ == "__main__":
    sys.exit(main())
