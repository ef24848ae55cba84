#!/usr/bin/python3
"""pxfabric demo: 4 MPI ranks as engines, steered with the stock ipyparallel client.

1. ``pxcluster start -n 4``: pxcontroller plus one ``mpirun -n 4`` job of engines
   (``build/bin/pxengine`` when it is built, else the stock MPI ipengines, with a note).
2. The stock client: ``rc.ids``; ``%px`` through an IPython shell running an mpi4py
   ``allreduce`` on ``COMM_WORLD`` (every rank gets 0+1+2+3 = 6); a load-balanced map.
3. ``pxcluster stop`` -- always, even on failure.

Everything lives in a temporary IPYTHONDIR (profile ``pxdemo``), removed at the end.
Exit status 0 when every step gave the expected result, 1 otherwise.
"""

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[1]
PXCLUSTER = REPO / "scripts" / "pxcluster"
N = 4
PROFILE = "pxdemo"


def section(title):
    print(f"\n=== {title}", flush=True)


def check(ok, what):
    print(f"  [{'ok' if ok else 'FAILED'}] {what}", flush=True)
    if not ok:
        raise AssertionError(what)


def pxcluster(*args, timeout):
    return subprocess.run([PYTHON, str(PXCLUSTER), *args], timeout=timeout).returncode


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="pxfabric-demo-"))
    os.environ["IPYTHONDIR"] = str(work / "ipython")  # before IPython is imported
    sys.path.insert(0, str(REPO / "python"))
    from pxfabric import cluster as pxc

    state_file = pxc.state_path(pxc.resolve_profile_dir(PROFILE, create=False))
    engines = "pxengine" if pxc.pxengine_available() else "ipengine"
    rc = None
    failed = False
    try:
        section(f"pxcluster start -n {N} --profile {PROFILE} --engines {engines}")
        if engines == "ipengine":
            print("  note: build/bin/pxengine is not built yet, so the ranks run the stock MPI "
                  "engines (python3 -m ipyparallel.engine --mpi) under the same mpirun job.",
                  flush=True)
        code = pxcluster("start", "-n", str(N), "--profile", PROFILE, "--engines", engines,
                         "--timeout", "240", timeout=300)
        check(code == 0, f"pxcluster start exited with {code}")

        section("the stock client")
        import ipyparallel as ipp

        rc = ipp.Client(profile=PROFILE, timeout=30)
        rc.wait_for_engines(N, timeout=60)
        print(f"  rc.ids = {rc.ids}")
        check(rc.ids == list(range(N)), f"{N} engines, ids 0..{N - 1}")
        where = rc[:].apply_sync(
            lambda: (__import__("mpi4py.MPI").MPI.COMM_WORLD.rank,
                     __import__("socket").gethostname(), __import__("os").getpid()))
        for eid, (rank, host, pid) in zip(rc.ids, where):
            print(f"  engine {eid}: MPI rank {rank} of {N}, host {host}, pid {pid}")
        check([w[0] for w in where] == rc.ids, "engine id == MPI rank")

        section("%px with mpi4py on COMM_WORLD")
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config

        config = Config()
        config.HistoryManager.hist_file = ":memory:"  # nothing left in the temporary IPYTHONDIR
        ip = InteractiveShell.instance(config=config)
        dv = rc[:]
        dv.block = True  # %px waits for every rank and shows its output
        dv.activate()    # %px, %%px, %autopx, %pxresult now target all ranks
        cell = "from mpi4py import MPI; r = MPI.COMM_WORLD.allreduce(MPI.COMM_WORLD.rank)"
        print(f"  %px {cell}")
        ip.run_line_magic("px", cell)
        print("  %px print(r)")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            ip.run_line_magic("px", "print(r)")
        printed = out.getvalue()
        print("\n".join("    " + line for line in printed.strip().splitlines()))
        per_rank = dict(re.findall(r"\[stdout:(\d+)\]\s*(\S+)", printed))
        check(per_rank == {str(i): "6" for i in range(N)},
              f"every rank printed 6 (= 0+1+2+3): {per_rank}")
        check(rc[:].pull("r", block=True) == [6] * N, "pull('r') == [6, 6, 6, 6]")

        section("load-balanced map: rc.load_balanced_view().map_sync(lambda x: x*x, range(100))")
        t0 = time.perf_counter()
        squares = rc.load_balanced_view().map_sync(lambda x: x * x, range(100))
        dt = time.perf_counter() - t0
        print(f"  {squares[:8]} ... {squares[-3:]}  (100 tasks in {dt:.2f}s)")
        check(squares == [x * x for x in range(100)], "100 squares, in order")
        section("demo passed")
    except Exception as e:  # report, then stop the cluster below
        failed = True
        print(f"\npxfabric demo FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        if rc is not None:
            with contextlib.suppress(Exception):
                rc.close()
        if state_file.exists():
            section(f"pxcluster stop --profile {PROFILE}")
            try:
                code = pxcluster("stop", "--profile", PROFILE, timeout=120)
            except subprocess.TimeoutExpired:
                code = "timeout"
            if code != 0:
                failed = True
                print(f"pxcluster stop failed ({code}); state in {state_file}", file=sys.stderr)
        if not failed:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work / 'ipython' / ('profile_' + PROFILE) / 'log'}",
                  file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
