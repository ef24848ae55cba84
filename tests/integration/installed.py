"""Helpers for the install tests (test_install.py, test_install_deb.py): run an installed
pxfabric the way a user on another machine would.

* ``install_prefix`` -- ``cmake --install BUILD --prefix DIR`` of the already-built build tree
  (``$PXF_BUILD_DIR``, default ``<repo>/build``; only read: nothing is built into it).
* ``Sandbox`` -- commands with a clean environment (``PATH=<prefix>/bin:/usr/bin:/bin``, no
  ``PYTHONPATH``, a private ``HOME`` and ``IPYTHONDIR``, a working directory outside the
  checkout) and, where the kernel lets us (root), the checkout and the build tree out of reach:
  each command runs in its own mount namespace with an empty tmpfs over both, so an installed
  file that still points into them fails here. Every process a sandbox starts carries a marker
  variable in its environment; ``reap`` finds survivors by that marker and stops them by PID.
* ``CLIENT`` -- the stock client (a subprocess in the same clean environment): waits for N
  engines, and asks each rank where it imported pxfabric from and for an MPI allreduce.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))
# the checkout's copy, in the test process only: what a sandbox runs is the installed one
from pxfabric import processes  # noqa: E402  (stopping by PID, shared with pxcluster and bench/)

BUILD = Path(os.environ.get("PXF_BUILD_DIR") or REPO / "build").resolve()
CLI_TIMEOUT = 240.0           # one pxcluster/ipcluster/cmake command (2 busy cores)
GONE_TIMEOUT = 20.0           # every process of a stopped cluster gone

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_mpi_yield_when_idle": "1",
}


def project_version() -> str:
    """``project(pxfabric VERSION x.y.z ...)`` from the top CMakeLists.txt."""
    text = (REPO / "CMakeLists.txt").read_text()
    m = re.search(r"project\(\s*pxfabric\s+VERSION\s+([0-9.]+)", text)
    assert m, "no project(pxfabric VERSION ...) in CMakeLists.txt"
    return m.group(1)


def build_problem() -> Optional[str]:
    """Why BUILD cannot be installed from (None: it can)."""
    if not (BUILD / "cmake_install.cmake").is_file():
        return f"{BUILD} is not a configured build tree (bash scripts/build.sh, or set PXF_BUILD_DIR)"
    for name in ("pxcontroller", "pxengine"):
        if not os.access(BUILD / "bin" / name, os.X_OK):
            return f"{BUILD / 'bin' / name} is not built (bash scripts/build.sh)"
    return None


def install_prefix(prefix: Path, *extra: str) -> None:
    """``cmake --install BUILD --prefix PREFIX [extra...]``; a failure shows cmake's words."""
    r = subprocess.run(["cmake", "--install", str(BUILD), "--prefix", str(prefix), *extra],
                       capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 0, f"cmake --install failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


def _outermost(dirs: Sequence[Path]) -> List[Path]:
    """The directories to cover: a directory inside another one is covered with it."""
    out: List[Path] = []
    for d in sorted({Path(d).resolve() for d in dirs}, key=lambda p: len(p.parts)):
        if d.is_dir() and not any(d == o or o in d.parents for o in out):
            out.append(d)
    return out


HIDDEN = _outermost([REPO, BUILD])
_HIDE_SCRIPT = ('n=$1; shift; while [ "$n" -gt 0 ]; do '
                'mount -t tmpfs -o size=1m,mode=0755 pxf-out-of-reach "$1" || exit 97; '
                'shift; n=$((n-1)); done; exec "$@"')


def _hide_prefix(dirs: Sequence[Path]) -> List[str]:
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", _HIDE_SCRIPT,
            "sh", str(len(dirs)), *map(str, dirs)]


def can_hide() -> bool:
    """Whether commands can run with the checkout and build tree covered (root, mount
    namespaces). Without it the tests still run from a copied prefix with a clean
    environment, only without that guarantee."""
    if not shutil.which("unshare"):
        return False
    probe = _hide_prefix(HIDDEN) + ["/bin/sh", "-c", 'test ! -e "$1/CMakeLists.txt"', "sh",
                                    str(REPO)]
    try:
        return subprocess.run(probe, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Sandbox:
    """A clean environment around one installed prefix (see the module docstring)."""

    def __init__(self, prefix: Path, workdir: Path, hide: bool,
                 extra_env: Optional[Dict[str, str]] = None):
        self.prefix = prefix
        self.workdir = workdir
        self.hide = hide
        self.marker = uuid.uuid4().hex
        home = workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.ipythondir = workdir / "ipython"
        self.env = {
            "PATH": f"{prefix / 'bin'}:/usr/bin:/bin", "HOME": str(home),
            "IPYTHONDIR": str(self.ipythondir), "LANG": "C.UTF-8",
            "PXF_TEST_SANDBOX": self.marker, **MPI_ENV, **(extra_env or {}),
        }

    def argv(self, argv: Sequence[str]) -> List[str]:
        return (_hide_prefix(HIDDEN) if self.hide else []) + list(argv)

    def run(self, argv: Sequence[str], timeout: float = CLI_TIMEOUT, check: bool = True,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        r = subprocess.run(self.argv(argv), env=env or self.env, cwd=str(self.workdir),
                           capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, (f"{' '.join(argv)}: rc {r.returncode}\n"
                                       f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")
        return r

    def popen(self, argv: Sequence[str], log: Path,
              env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        with open(log, "wb") as f:
            return subprocess.Popen(self.argv(argv), env=env or self.env, cwd=str(self.workdir),
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def client(self, n: int, profile_dir: Path, timeout: float = 120.0,
               env: Optional[Dict[str, str]] = None) -> List[list]:
        """The stock client: [pxfabric.__file__, allreduce of rank+1] from every rank."""
        script = self.workdir / "client.py"
        script.write_text(CLIENT)
        r = self.run(["/usr/bin/python3", str(script), str(profile_dir), str(n), str(timeout)],
                     timeout=timeout + 60, env=env)
        return json.loads(r.stdout.strip().splitlines()[-1])

    def survivors(self) -> List[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            try:
                if p.environ().get("PXF_TEST_SANDBOX") == self.marker \
                        and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def wait_gone(self, timeout: float = GONE_TIMEOUT) -> List[psutil.Process]:
        deadline = time.monotonic() + timeout
        while True:
            left = self.survivors()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.3)

    def reap(self) -> List[str]:
        """Stop whatever this sandbox started that is still running (SIGTERM, then SIGKILL,
        by PID); returns their command lines for the failure message."""
        left = self.survivors()
        desc = []
        for p in left:
            try:
                desc.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
            except psutil.Error:
                pass
        processes.stop_procs(left, grace=5.0)
        return desc


CLIENT = textwrap.dedent("""
    import json, os, sys, time
    import ipyparallel as ipp

    profile_dir, n, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    client_file = os.path.join(profile_dir, "security", "ipcontroller-client.json")
    deadline = time.monotonic() + timeout
    while not os.path.exists(client_file):
        if time.monotonic() > deadline:
            sys.exit(f"no {client_file} within {timeout:g} s")
        time.sleep(0.2)
    rc = ipp.Client(client_file)
    rc.wait_for_engines(n, timeout=max(1.0, deadline - time.monotonic()))

    def probe():
        import pxfabric
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        return [pxfabric.__file__, comm.allreduce(comm.rank + 1)]

    out = rc[:].apply_sync(probe)
    rc.close()
    print(json.dumps(out))
""")
