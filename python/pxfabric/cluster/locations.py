"""Where a cluster's files are: the profile directory, its state file, connection files and
logs, and the registry of started clusters (for ``pxcluster list``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Optional


def ipython_dir() -> Path:
    """``$IPYTHONDIR`` or ``~/.ipython``, as ``IPython.paths.get_ipython_dir`` resolves it
    (without importing IPython, which costs seconds on a busy machine)."""
    env = os.environ.get("IPYTHONDIR")
    return Path(env or "~/.ipython").expanduser().resolve()


def resolve_profile_dir(profile: Optional[str] = None, profile_dir: Optional[str] = None,
                        create: bool = True) -> Path:
    """``profile_dir`` if given, else ``$IPYTHONDIR/profile_<profile or default>``.

    With ``create`` the directory and its ``security``/``log`` folders are made (0700 for
    ``security``), the way IPython makes profile directories.
    """
    if profile_dir:
        path = Path(profile_dir).expanduser().resolve()
    else:
        path = ipython_dir() / f"profile_{profile or 'default'}"
    if create:
        path.mkdir(parents=True, exist_ok=True)
        (path / "security").mkdir(mode=0o700, exist_ok=True)
        (path / "log").mkdir(exist_ok=True)
    return path


def _tag(cluster_id: str) -> str:
    return cluster_id or "default"


def state_path(profile_dir: Path, cluster_id: str = "") -> Path:
    return Path(profile_dir) / "security" / f"pxcluster-{_tag(cluster_id)}.json"


def connection_files(profile_dir: Path, cluster_id: str = "") -> Dict[str, Path]:
    prefix = f"ipcontroller-{cluster_id}" if cluster_id else "ipcontroller"
    sec = Path(profile_dir) / "security"
    return {kind: sec / f"{prefix}-{kind}.json" for kind in ("client", "engine")}


def log_paths(profile_dir: Path, cluster_id: str = "") -> Dict[str, Path]:
    log = Path(profile_dir) / "log"
    return {
        "controller": log / f"pxcontroller-{_tag(cluster_id)}.log",
        "engines": log / f"pxengines-{_tag(cluster_id)}.log",
    }


def _registry_dir() -> Path:
    """``$IPYTHONDIR/pxcluster/``: one small pointer file per started cluster (for ``list``)."""
    return ipython_dir() / "pxcluster"


def _registry_entry(state_file: Path) -> Path:
    digest = hashlib.sha1(str(state_file).encode()).hexdigest()[:16]
    return _registry_dir() / f"{digest}.json"
