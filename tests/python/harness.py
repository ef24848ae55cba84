"""Processes for the runtime tests: a stock controller, pyengines and (for parity) stock engines.

Every process is started here and stopped here by PID (SIGTERM, then SIGKILL after a
timeout), together with the descendants recorded while it ran. Nothing is ever stopped by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

import psutil

PYTHON = "/usr/bin/python3"
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYENGINE = HERE / "pyengine.py"
sys.path.insert(0, str(REPO / "python"))
from pxfabric import processes  # noqa: E402  (stopping by PID, shared with pxcluster and bench/)

CONTROLLER_TIMEOUT = 60.0
ENGINE_TIMEOUT = 90.0
STOP_TIMEOUT = 10.0


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until truthy; raise ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


class Processes:
    """Remembers the processes we started (and their descendants) and stops them by PID."""

    def __init__(self) -> None:
        self.popens: Dict[int, subprocess.Popen] = {}
        self.known: Dict[int, psutil.Process] = {}

    def start(self, argv: List[str], log: Path, env: Optional[dict] = None) -> subprocess.Popen:
        full_env = dict(os.environ)
        full_env.pop("PYTEST_CURRENT_TEST", None)
        full_env["PYTHONDONTWRITEBYTECODE"] = "1"
        if env:
            full_env.update(env)
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=full_env, cwd=str(log.parent),
            )
        self.popens[popen.pid] = popen
        try:
            self.known[popen.pid] = psutil.Process(popen.pid)
        except psutil.NoSuchProcess:
            pass
        return popen

    def refresh(self) -> None:
        for proc in list(self.known.values()):
            try:
                for child in proc.children(recursive=True):
                    self.known.setdefault(child.pid, child)
            except psutil.Error:
                pass

    def stop(self, pids: Optional[List[int]] = None, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the given PIDs (default: all) and their descendants, SIGKILL stragglers."""
        self.refresh()
        targets = [proc for pid, proc in self.known.items()
                   if pids is None or pid in pids or _descends(proc, pids)]
        processes.terminate(targets, timeout)
        for pid, popen in self.popens.items():
            if pids is None or pid in pids:
                try:
                    popen.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass


def _descends(proc: psutil.Process, pids: List[int]) -> bool:
    try:
        return any(p.pid in pids for p in proc.parents())
    except psutil.Error:
        return False


class Cluster:
    """A stock ``ipcontroller`` plus engines, in a private profile directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.profile = workdir / "profile"
        self.profile.mkdir(parents=True, exist_ok=True)
        self.procs = Processes()
        self.engines: Dict[str, dict] = {}  # uuid -> {"kind", "pid", "log"}
        self.controller: Optional[subprocess.Popen] = None

    @property
    def engine_file(self) -> Path:
        return self.profile / "security" / "ipcontroller-engine.json"

    @property
    def client_file(self) -> Path:
        return self.profile / "security" / "ipcontroller-client.json"

    def start_controller(self) -> None:
        log = self.workdir / "controller.log"
        self.controller = self.procs.start(
            [PYTHON, "-m", "ipyparallel.controller", f"--profile-dir={self.profile}",
             "--ip=127.0.0.1", "--ping=250"],
            log,
        )

        def ready():
            if self.controller.poll() is not None:
                raise RuntimeError(f"controller exited:\n{tail(log)}")
            return self.engine_file.exists() and self.client_file.exists() and _complete_json(
                self.client_file
            )

        wait_until(ready, CONTROLLER_TIMEOUT, "the controller's connection files")

    def start_pyengine(self, engine_id: Optional[int] = None, extra: List[str] = ()) -> str:
        uuid = str(uuidlib.uuid4())
        log = self.workdir / f"pyengine-{uuid[:8]}.log"
        argv = [PYTHON, str(PYENGINE), f"--file={self.engine_file}", f"--uuid={uuid}",
                f"--profile-dir={self.profile}", "--log-level=20", *extra]
        if engine_id is not None:
            argv.append(f"--id={engine_id}")
        popen = self.procs.start(argv, log)
        self.engines[uuid] = {"kind": "py", "pid": popen.pid, "log": log, "popen": popen}
        return uuid

    def start_stock_engine(self) -> int:
        """Start a stock ``ipengine``; returns its PID (its uuid is learned at registration)."""
        log = self.workdir / f"stock-engine-{len(self.engines)}.log"
        popen = self.procs.start(
            [PYTHON, "-m", "ipyparallel.engine", f"--profile-dir={self.profile}"], log
        )
        return popen.pid

    def wait_for_engines(self, client, uuids: List[str], count: int) -> None:
        def ready():
            for uuid in uuids:
                info = self.engines.get(uuid)
                if info and info["popen"].poll() is not None:
                    raise RuntimeError(f"pyengine {uuid} exited:\n{tail(info['log'])}")
            engines = set(client._engines.values())
            return len(client.ids) >= count and all(u in engines for u in uuids)

        wait_until(ready, ENGINE_TIMEOUT, f"{count} engines to register")

    def stop(self) -> None:
        self.procs.stop()


def _complete_json(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()))
    except (OSError, ValueError):
        return False


def engine_id_for(client, uuid: str) -> int:
    for eid, u in client._engines.items():
        if u == uuid:
            return eid
    raise KeyError(uuid)
