"""The state file that records what ``pxcluster start`` started (read by stop, list, restart,
where), written atomically, and the profile lock around check-then-record steps."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from .locations import _registry_entry

STATE_VERSION = 1


def _write_json_atomic(path: Path, data: Any, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _profile_lock(profile_dir: Path):
    """Serialise pxcluster's check-then-record steps on one profile (flock on ``security/``)."""
    fd = os.open(str(Path(profile_dir) / "security"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_state(path: Path) -> Optional[dict]:
    state = _read_json(path)
    if state is None or "controller" not in state:
        return None
    return state


def save_state(state: dict) -> None:
    path = Path(state["state_file"])
    _write_json_atomic(path, state)
    with contextlib.suppress(OSError):
        _write_json_atomic(_registry_entry(path), {"state_file": str(path)})


def remove_state(path: Path) -> None:
    _unlink(Path(path))
    with contextlib.suppress(OSError):
        _unlink(_registry_entry(Path(path)))
