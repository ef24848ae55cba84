"""Start pxcontroller plus ``mpirun -n N pxengine`` for the engine tests (test_engine_*.py).

Binaries come from ``$PXF_BUILD_DIR/bin`` (default ``<repo>/build/bin``). Every process is
stopped by PID (mpirun and all its descendants, found with psutil), never by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import MPI_ENV, ClientsMixin, HarnessError, ProcessTracker, log_tail, wait_until  # noqa: E402
import cluster as _harness  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("PXF_BUILD_DIR", REPO / "build"))
PXCONTROLLER = BUILD / "bin" / "pxcontroller"
PXENGINE = BUILD / "bin" / "pxengine"

class JobError(RuntimeError):
    pass


def mpirun() -> str:
    try:
        return _harness.mpirun()
    except HarnessError as e:
        raise JobError(str(e)) from None


class EngineJob(ClientsMixin):
    """One pxcontroller in a private profile dir and one MPI job of pxengine ranks."""

    def __init__(self, workdir: Path, n: int = 4) -> None:
        self.workdir = Path(workdir)
        self.profile_dir = self.workdir / "profile"
        self.n = n
        self.engine_extra: List[str] = []  # more pxengine options for start_engines()
        self.tracker = ProcessTracker()
        self.controller: Optional[subprocess.Popen] = None
        self.job: Optional[subprocess.Popen] = None
        self.controller_log = self.workdir / "controller.log"
        self.engine_log = self.workdir / "engines.log"
        self._clients: list = []
        self.env = dict(os.environ)
        self.env.update(MPI_ENV)
        self.env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
                        IPYTHONDIR=str(self.workdir / "ipython"))

    def logs(self, lines: int = 60) -> str:
        return (f"--- controller log:\n{log_tail(self.controller_log, lines)}\n"
                f"--- engine job log:\n{log_tail(self.engine_log, lines)}")

    def _popen(self, argv: List[str], log: Path, group: str, **kw) -> subprocess.Popen:
        with open(log, "ab") as out:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 cwd=self.workdir, env=kw.pop("env", self.env),
                                 start_new_session=True, **kw)
        self.tracker.add_popen(p, group)
        return p

    def start_controller(self, timeout: float = 30.0) -> None:
        for b in (PXCONTROLLER, PXENGINE):
            if not os.access(b, os.X_OK):
                raise JobError(f"{b} missing: build it, or set PXF_BUILD_DIR")
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        self.controller = self._popen(
            [str(PXCONTROLLER), f"--profile-dir={self.profile_dir}", "--ip=127.0.0.1",
             "--ping=250", "--log-level=10"], self.controller_log, "controller")
        engine_file = self.profile_dir / "security" / "ipcontroller-engine.json"

        def ready():
            if self.controller.poll() is not None:
                raise JobError(f"pxcontroller exited with {self.controller.returncode}\n{self.logs()}")
            try:
                return "pxf_fabric" in json.loads(engine_file.read_text())
            except (OSError, ValueError):
                return False

        wait_until(ready, timeout, 0.1, "the engine connection file")

    def engine_argv(self, n: Optional[int] = None, extra: List[str] = ()) -> List[str]:
        n = self.n if n is None else n
        return [mpirun(), "-n", str(n), str(PXENGINE), f"--profile-dir={self.profile_dir}",
                "--log-level=20", *extra]

    def start_engines(self, timeout: float = 120.0) -> None:
        self.job = self._popen(self.engine_argv(extra=self.engine_extra), self.engine_log, "engine")
        rc = self.client()
        try:
            deadline = time.monotonic() + timeout
            while len(rc.ids) < self.n:
                if self.job.poll() is not None:
                    raise JobError(f"mpirun exited with {self.job.returncode}\n{self.logs()}")
                if time.monotonic() > deadline:
                    raise JobError(f"only {len(rc.ids)} of {self.n} engines after {timeout}s\n{self.logs()}")
                time.sleep(0.2)
        finally:
            self.close_client(rc)
        self.tracker.refresh()

    def start(self) -> "EngineJob":
        try:
            self.start_controller()
            self.start_engines()
        except BaseException:
            self.stop()
            raise
        return self

    def start_or_fail(self) -> "EngineJob":
        """start(), turning a JobError into a clean pytest failure with the logs."""
        import pytest

        try:
            return self.start()
        except JobError as e:
            pytest.fail(str(e), pytrace=False)

    def engine_processes(self) -> List[psutil.Process]:
        return self.tracker.alive(self.tracker.group("engine"))

    def wait_job(self, timeout: float) -> int:
        return self.job.wait(timeout=timeout)

    def stop(self) -> List[int]:
        for rc in list(self._clients):
            self.close_client(rc)
        killed = self.tracker.stop(self.tracker.group("engine"))
        killed += self.tracker.stop()
        return killed


def module_job(tmp_path_factory, name: str, n: int):
    """Body of a module-scoped fixture: one started EngineJob, stopped afterwards.

    Use as ``yield from engine_job.module_job(tmp_path_factory, "name", N)``."""
    j = EngineJob(tmp_path_factory.mktemp(name), n).start_or_fail()
    yield j
    j.stop()
