"""What pxcluster tells the user: its error, its progress lines, and the commands that reach a
recorded cluster again (``pxcluster stop --profile ...``, ``ipp.Client(profile=...)``)."""

from __future__ import annotations

import shlex
import sys


class ClusterError(RuntimeError):
    """A cluster could not be started, stopped or found; the message says why and where."""


def _say(msg: str, stream=None) -> None:
    print(f"pxcluster: {msg}", file=stream or sys.stdout, flush=True)


def _selector_args(state: dict) -> str:
    parts = []
    if state.get("profile"):
        parts.append(f"--profile {shlex.quote(state['profile'])}")
    else:
        parts.append(f"--profile-dir {shlex.quote(state['profile_dir'])}")
    if state.get("cluster_id"):
        parts.append(f"--cluster-id {shlex.quote(state['cluster_id'])}")
    return " ".join(parts)


def connect_hint(state: dict) -> str:
    kw = []
    if state.get("profile"):
        kw.append(f"profile={state['profile']!r}")
    else:
        kw.append(f"profile_dir={state['profile_dir']!r}")
    if state.get("cluster_id"):
        kw.append(f"cluster_id={state['cluster_id']!r}")
    return ("    import ipyparallel as ipp\n"
            f"    rc = ipp.Client({', '.join(kw)})")
