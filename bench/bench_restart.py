#!/usr/bin/python3
"""Recovery time: ``pxcluster restart`` against stock's ``ipcluster stop`` + ``ipcluster start``.

What a user does when a cell hangs on every rank's MPI job, timed from the command to all N
engines usable again (an apply on every engine answered):

* **pxfabric**: ``pxcluster restart`` (a new MPI job under the same controller; the *same*
  client, already connected, sees ids 0..N-1 again and runs ``rc[:].apply_sync``).
* **stock**: stock offers no recovery of the engines alone, so: ``ipcluster stop``, then
  ``ipcluster start -n N --engines=MPI --daemonize`` (a new controller, so a new
  ``ipyparallel.Client``), ``wait_for_engines(N)``, then the apply on all.

N = 2, 4, 8; ``--reps`` trials per N, pxfabric and stock alternating (which goes first
alternates by trial), medians and paired ratios. Every cluster lives in a private temp
IPYTHONDIR/profile dir; everything is stopped with ``pxcluster stop`` / ``ipcluster stop`` and
then by PID (the pxcluster state file, ipcluster's cluster file, their process trees).

    /usr/bin/python3 bench/bench_restart.py [--ns 2,4,8] [--reps 3] [--json PATH]

Binaries: ``$PXF_CONTROLLER`` / ``$PXF_ENGINE`` (what pxcluster runs; default build/bin).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402
import _report as R  # noqa: E402
from pxfabric import processes as P  # noqa: E402  (on sys.path through _harness: stopping by PID)

PYTHON = h.PYTHON
REPO = h.REPO
PXCLUSTER = [PYTHON, str(REPO / "scripts" / "pxcluster")]
IPCLUSTER = [PYTHON, "-m", "ipyparallel.cluster"]
STEP_TIMEOUT = 180.0


def getpid():
    import os

    return os.getpid()


class Side:
    """One kind's cluster in its own IPYTHONDIR/profile dir, and the PIDs it ever had."""

    def __init__(self, kind: str, n: int, root: Path) -> None:
        self.kind, self.n = kind, n
        self.dir = root / f"{kind}-{n}"
        self.profile_dir = self.dir / "profile"
        self.env = dict(os.environ, IPYTHONDIR=str(self.dir / "ipython"), PYTHONUNBUFFERED="1",
                        **h.MPI_ENV)
        self.seen: Dict[int, float] = {}
        self.rc = None

    # -- processes
    def note_tree(self, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            for q in [p] + p.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.seen.setdefault(q.pid, q.create_time())

    def note_state(self) -> None:
        """PIDs from pxcluster's state file / ipcluster's cluster file."""
        sec = self.profile_dir / "security"
        for f in list(sec.glob("pxcluster-*.json")) + list(sec.glob("cluster-*.json")):
            with contextlib.suppress(OSError, ValueError):
                text = f.read_text()
                for m in re.finditer(r'"pid":\s*(\d+)', text):
                    self.note_tree(int(m.group(1)))

    def alive(self) -> List[psutil.Process]:
        left = []
        for pid, ct in self.seen.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if abs(p.create_time() - ct) <= 1.0 and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
        return left

    def kill_survivors(self, wait: float = 0.0) -> List[int]:
        """Wait up to ``wait`` s for our processes to exit, SIGKILL the rest; their PIDs."""
        return P.kill(P.wait_gone(self.alive(), wait))

    def run(self, argv: List[str], timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess:
        res = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout,
                             cwd=self.dir)
        if res.returncode != 0:
            raise h.HarnessError(f"{' '.join(argv)} failed ({res.returncode}):\n"
                                 f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
        return res

    # -- client
    def client(self):
        import ipyparallel as ipp

        old = os.environ.get("IPYTHONDIR")
        os.environ["IPYTHONDIR"] = self.env["IPYTHONDIR"]
        try:
            return ipp.Client(profile_dir=str(self.profile_dir), timeout=60)
        finally:
            if old is None:
                os.environ.pop("IPYTHONDIR", None)
            else:
                os.environ["IPYTHONDIR"] = old

    def usable(self, rc) -> None:
        """All N engines answer an apply, and they are ids 0..N-1."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while rc.ids != list(range(self.n)):
            if time.monotonic() > deadline:
                raise h.HarnessError(f"{self.kind}: ids {rc.ids} after the restart")
            time.sleep(0.01)
        pids = rc[:].apply_sync(getpid)
        if len(set(pids)) != self.n:
            raise h.HarnessError(f"{self.kind}: {len(set(pids))} distinct engines of {self.n}")

    # -- pxfabric
    def px_start(self) -> None:
        self.profile_dir.mkdir(parents=True)
        self.run(PXCLUSTER + ["start", "-n", str(self.n), "--profile-dir", str(self.profile_dir)])
        self.note_state()
        self.rc = self.client()
        self.usable(self.rc)

    def px_restart(self) -> dict:
        t0 = time.monotonic()
        res = self.run(PXCLUSTER + ["restart", "--profile-dir", str(self.profile_dir)])
        t_cli = time.monotonic() - t0
        self.note_state()
        self.usable(self.rc)
        t_all = time.monotonic() - t0
        m = re.search(r"restarted \d+ engines \(ids [^)]*\) in ([0-9.]+) s", res.stdout)
        out = {"usable_s": t_all, "command_s": t_cli,
               "reported_s": float(m.group(1)) if m else None}
        with contextlib.suppress(OSError, ValueError, KeyError):
            state = json.loads((self.profile_dir / "security" / "pxcluster-default.json").read_text())
            out.update(state["restart_phases"])
        return out

    # -- stock
    def stock_cmd(self, verb: str) -> List[str]:
        argv = IPCLUSTER + [verb, f"--profile-dir={self.profile_dir}"]
        if verb == "start":
            argv += [f"-n={self.n}", "--engines=MPI", "--daemonize",
                     "--IPController.ip=127.0.0.1"]
        return argv

    def stock_start(self) -> None:
        self.profile_dir.mkdir(parents=True)
        self.run(self.stock_cmd("start"))
        self.note_state()
        self.rc = self.client()
        self.rc.wait_for_engines(self.n, timeout=STEP_TIMEOUT)
        self.note_state()
        self.usable(self.rc)

    def stock_restart(self) -> dict:
        self.note_state()
        t0 = time.monotonic()
        self.rc.close()
        self.run(self.stock_cmd("stop"))
        t_stop = time.monotonic() - t0
        self.run(self.stock_cmd("start"))
        self.note_state()
        self.rc = self.client()
        self.rc.wait_for_engines(self.n, timeout=STEP_TIMEOUT)
        self.usable(self.rc)
        t_all = time.monotonic() - t0
        self.note_state()
        return {"usable_s": t_all, "stop_s": t_stop}

    def stop(self) -> List[int]:
        self.note_state()
        if self.rc is not None:
            with contextlib.suppress(Exception):
                self.rc.close()
        with contextlib.suppress(Exception):
            if self.kind == "px":
                self.run(PXCLUSTER + ["stop", "--profile-dir", str(self.profile_dir)], 90)
            else:
                self.run(self.stock_cmd("stop"), 90)
        return self.kill_survivors(wait=15)  # what the stop signalled may still be exiting


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="2,4,8", help="engine counts (default 2,4,8)")
    ap.add_argument("--reps", type=int, default=3, help="trials per N and kind (default 3)")
    ap.add_argument("--kinds", default="px,stock", help="px,stock (default both)")
    ap.add_argument("--timeout", type=float, default=1800, help="hard limit for the run (s)")
    ap.add_argument("--json", default=None, help="result file (default bench/results/restart-<UTC>.json)")
    args = ap.parse_args(argv)
    ns = [int(x) for x in args.ns.split(",") if x]
    kinds = [k for k in args.kinds.split(",") if k]
    h.install_time_limit(args.timeout)
    stamp = datetime.datetime.utcnow().strftime("%Y%m%dT%H%M%SZ")
    out_path = Path(args.json or REPO / "bench" / "results" / f"restart-{stamp}.json")
    print(f"machine load: {h.machine_load()}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="pxf-bench-restart-"))
    results: Dict[str, dict] = {"when": stamp, "reps": args.reps, "ns": ns,
                                "machine_load_start": h.machine_load(), "runs": {}}
    with contextlib.suppress(Exception):
        results["pxcontroller"] = h.binary_info(os.environ.get("PXF_CONTROLLER")
                                                or str(h.DEFAULT_PXCONTROLLER))
        results["pxengine"] = h.binary_info(os.environ.get("PXF_ENGINE")
                                            or str(h.DEFAULT_PXENGINE))
    sides: List[Side] = []
    ok = False
    try:
        for n in ns:
            row: Dict[str, list] = {k: [] for k in kinds}
            here = {k: Side(k, n, root) for k in kinds}
            sides += here.values()
            for k, side in here.items():
                (side.px_start if k == "px" else side.stock_start)()
            for rep in range(args.reps):
                order = kinds if rep % 2 == 0 else kinds[::-1]
                for k in order:
                    side = here[k]
                    r = side.px_restart() if k == "px" else side.stock_restart()
                    row[k].append(r)
                    print(f"N={n} rep {rep + 1} {k}: usable again after {r['usable_s']:.2f} s "
                          + ", ".join(f"{a}={b:.2f}" for a, b in r.items()
                                      if a != "usable_s" and b is not None), flush=True)
            for side in here.values():
                left = side.stop()
                if left:
                    print(f"warning: SIGKILLed survivors {left} ({side.kind}, N={n})",
                          file=sys.stderr)
            summ = {k: h.summary(r["usable_s"] for r in row[k]) for k in kinds}
            if "px" in row and "stock" in row:
                ratios = [s["usable_s"] / p["usable_s"] for p, s in zip(row["px"], row["stock"])]
                summ["paired_ratio_stock_over_px"] = h.summary(ratios)
            results["runs"][str(n)] = {"trials": row, "summary": summ}
        ok = True
    finally:
        for side in sides:
            with contextlib.suppress(Exception):
                side.stop()
        results["machine_load_end"] = h.machine_load()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"logs kept in {root}", file=sys.stderr)

    print()
    print("| N | pxcluster restart → usable, s (median) | ipcluster stop + start → usable, s "
          "(median) | stock / px (paired median) |")
    print("|---|---|---|---|")
    for n in ns:
        s = results["runs"][str(n)]["summary"]
        px = s.get("px", {}).get("median")
        st = s.get("stock", {}).get("median")
        ratio = s.get("paired_ratio_stock_over_px", {}).get("median")
        print(f"| {n} | {R.fmt(px)} | {R.fmt(st)} | {R.fmt(ratio)}x |")
    print(f"\nJSON: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
