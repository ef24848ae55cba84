"""Time from an interrupt that does not land to the stuck-rank diagnosis on the client.

For N = 2, 4, 8 ranks (``pxcluster start -n N``, stock ``ipyparallel.Client``), each trial:
rank 0 enters ``MPI.COMM_WORLD.Barrier()`` alone (``%px if rank == 0: Barrier()``), the client
sends ``rc.send_signal(SIGINT, targets=[0])`` (what ``%px``'s Ctrl-C does), and the clock runs
until rank 0's report ("... `pxcluster restart` ...") is in ``ar.stderr``. The rank is then
freed by letting the other ranks join the Barrier (the pending KeyboardInterrupt ends the cell),
so one cluster serves every trial. Also timed: ``pxcluster where``'s collection (in-process,
``pxfabric.where.collect``) while rank 0 is stuck.

The diagnosis time includes the grace period (pxengine's ``--interrupt-grace``, default 3 s):
``after grace`` is the part pxfabric adds on top. Goal (issue 15): diagnosis <= 5 s.

    /usr/bin/python3 bench/bench_diagnosis.py [--ns 2,4,8] [--trials 5]
        [--pxengine PATH] [--pxcontroller PATH] [--grace S]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
from pxfabric import processes as P  # noqa: E402  (stopping by PID, shared with pxcluster and tests)

CELL = "if MPI.COMM_WORLD.rank == 0: MPI.COMM_WORLD.Barrier()"


def pxcluster(env, *args, timeout=300):
    return subprocess.run([PYTHON, str(REPO / "scripts" / "pxcluster"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def cluster_pids(profile_dir: Path) -> dict:
    pids = {}
    try:
        state = json.loads((profile_dir / "security" / "pxcluster-default.json").read_text())
    except (OSError, ValueError):
        return pids
    for group in ("controller", "engines"):
        rec = state.get(group) or {}
        for pid in [rec.get("pid")] + [d.get("pid") for d in rec.get("descendants", [])]:
            try:
                proc = psutil.Process(pid)
                pids[pid] = proc.create_time()
                for c in proc.children(recursive=True):
                    pids[c.pid] = c.create_time()
            except (psutil.Error, TypeError, ValueError):
                pass
    return pids


def kill_survivors(pids: dict) -> None:
    left = []
    for pid, ct in pids.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - ct) < 1.0 and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.Error:
            pass
    P.kill(left)


def stderr_of(ar, i):
    s = ar.stderr
    return (s if isinstance(s, str) else s[i]) or ""


def run_n(n: int, trials: int, env: dict, tmp: Path) -> dict:
    import ipyparallel as ipp

    from pxfabric.where import collect

    profile_dir = tmp / f"profile-{n}"
    sel = ["--profile-dir", str(profile_dir)]
    t0 = time.monotonic()
    res = pxcluster(env, "start", "-n", str(n), *sel, "--timeout", "240")
    pids = cluster_pids(profile_dir)
    out = {"n": n, "start_s": time.monotonic() - t0, "diagnosis_s": [], "where_s": [],
           "freed": []}
    if res.returncode != 0:
        out["error"] = res.stderr[-2000:]
        kill_survivors(pids)
        return out
    rc = None
    try:
        rc = ipp.Client(str(profile_dir / "security" / "ipcontroller-client.json"),
                        timeout=30)
        deadline = time.monotonic() + 30
        while len(rc.ids) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        rc[:].execute("from mpi4py import MPI", block=True)
        others = rc[1:]
        for _ in range(trials):
            ar = rc[:].execute(CELL, block=False)
            others.execute("pass", block=True)
            time.sleep(0.5)  # rank 0 is inside the Barrier
            t = time.monotonic()
            rc.send_signal(signal.SIGINT, targets=[0], block=True)
            while "pxcluster restart" not in stderr_of(ar, 0):
                if time.monotonic() - t > 60:
                    raise RuntimeError(f"no diagnosis within 60 s at N={n}: {ar.stderr}")
                time.sleep(0.01)
            out["diagnosis_s"].append(time.monotonic() - t)
            t = time.monotonic()
            states = collect(rc, timeout=10)
            out["where_s"].append(time.monotonic() - t)
            assert states[0].get("call") == "Comm.Barrier", states[0]
            # Free rank 0: the others join, the pending interrupt then ends its cell.
            others.execute("MPI.COMM_WORLD.Barrier()", block=True)
            try:
                ar.get(timeout=30)
                out["freed"].append("ok?")
            except Exception as e:
                out["freed"].append(type(e).__name__ if "KeyboardInterrupt" not in str(e)
                                    else "KeyboardInterrupt")
    finally:
        if rc is not None:
            rc.close()
        pids.update(cluster_pids(profile_dir))
        try:
            pxcluster(env, "stop", *sel, timeout=60)
        except subprocess.TimeoutExpired:
            pass
        kill_survivors(pids)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="2,4,8")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--pxengine", default=os.environ.get("PXF_PXENGINE")
                    or str(REPO / "build" / "bin" / "pxengine"))
    ap.add_argument("--pxcontroller", default=os.environ.get("PXF_PXCONTROLLER")
                    or str(REPO / "build" / "bin" / "pxcontroller"))
    ap.add_argument("--grace", type=float, default=None,
                    help="PXF_INTERRUPT_GRACE for the engines (default: pxengine's 3 s)")
    args = ap.parse_args()
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1",
               PXF_ENGINE=args.pxengine, PXF_CONTROLLER=args.pxcontroller)
    grace = 3.0
    if args.grace is not None:
        env["PXF_INTERRUPT_GRACE"] = str(args.grace)
        grace = args.grace
    else:
        env.pop("PXF_INTERRUPT_GRACE", None)
    results = []
    with tempfile.TemporaryDirectory(prefix="pxf-bench-diag-") as tmp:
        env["IPYTHONDIR"] = str(Path(tmp) / "ipython")
        for n in [int(x) for x in args.ns.split(",")]:
            r = run_n(n, args.trials, env, Path(tmp))
            results.append(r)
            if r.get("error"):
                print(f"N={n}: start failed: {r['error']}", flush=True)
                continue
            d = statistics.median(r["diagnosis_s"])
            w = statistics.median(r["where_s"])
            print(f"N={n}: diagnosis median {d:.2f} s (min {min(r['diagnosis_s']):.2f}, max "
                  f"{max(r['diagnosis_s']):.2f}; after grace {d - grace:.2f} s), where "
                  f"{w * 1000:.0f} ms, freed: {','.join(r['freed'])}", flush=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = REPO / "bench" / "results" / f"diagnosis-{stamp}.json"
    path.write_text(json.dumps({"grace_s": grace, "trials": args.trials, "results": results,
                                "pxengine": args.pxengine}, indent=2))
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
