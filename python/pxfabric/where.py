"""``pxcluster where``: every rank's current state and stack, ranks in the same state grouped.

Transport: one ``pxf_where_request`` per engine on the control channel, sent with a stock
``ipyparallel.Client`` (``Client._send`` on its control stream, as ``send_signal`` does). The
controller relays control messages of any type; each pxengine rank answers on its watch thread
(mpi/rank_watch.cpp), not on the main thread, so a rank stuck in MPI still answers -- where it is
comes from ``sys._current_frames`` (python/pxfabric/stuck.py), or from a faulthandler dump when
the main thread holds the GIL in native code. A stock ipengine does not know the message type
and never answers: it is named as such after ``timeout`` instead of hanging.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

DEFAULT_TIMEOUT = 5.0


def collect(rc, targets: Optional[Sequence[int]] = None,
            timeout: float = DEFAULT_TIMEOUT) -> Dict[int, dict]:
    """Ask every engine (or ``targets``) where it is; engine id -> reply content.

    Engines that did not answer within ``timeout`` seconds map to
    ``{"state": "no answer", ...}``.
    """
    ids = list(rc.ids if targets is None else targets)
    if not ids:
        return {}
    idents = rc._build_targets(ids)[0]
    futures = {}
    for eid, ident in zip(ids, idents):
        futures[rc._send(rc._control_stream, "pxf_where_request", content={}, ident=ident)] = eid
    done, _ = concurrent.futures.wait(list(futures), timeout=timeout)
    out: Dict[int, dict] = {}
    for fut, eid in futures.items():
        if fut in done:
            try:
                out[eid] = dict(fut.result()["content"])
            except Exception as e:  # a reply we cannot read: say so, keep the others
                out[eid] = {"state": "bad answer", "error": f"{type(e).__name__}: {e}"}
        else:
            out[eid] = {"state": "no answer"}
        out[eid]["engine_id"] = eid
    return out


def ranges(ids: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    ids = sorted(set(ids))
    parts: List[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def _key(s: dict) -> Tuple:
    frames = tuple((f.get("file"), f.get("line"), f.get("function")) for f in s.get("frames") or [])
    return (s.get("state"), s.get("where"), s.get("msg_type"), s.get("gil"), frames)


def _seconds(values: List[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.0f} s" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f} s"


def _describe(group: List[dict]) -> List[str]:
    s = group[0]
    state = s.get("state")
    if state == "idle":
        return ["idle"]
    if state != "busy":
        return [f"{state}: {s.get('error', '')}".rstrip(": ")]
    what = [f"running {s.get('msg_type') or 'a request'}"]
    if len(group) == 1 and s.get("msg_id"):
        what[0] += f" {s['msg_id']}"
    what[0] += f" for {_seconds([g.get('running_for', 0.0) for g in group])}"
    interrupted = [g["interrupted_for"] for g in group if g.get("interrupted_for") is not None]
    if interrupted:
        what.append(f"interrupted {_seconds(interrupted)} ago")
    lines = [f"{s.get('where') or 'busy'} ({', '.join(what)})"]
    frames = s.get("frames") or []
    if frames:
        lines.append("  Python stack (most recent call last):")
        for f in frames:
            lines.append(f"    {f['file']}, line {f['line']}, in {f['function']}")
            if f.get("code"):
                lines.append(f"      {f['code']}")
    return lines


def group_states(states: Dict[int, dict]) -> List[Tuple[List[int], List[dict]]]:
    """Ranks in the same state (same place, same stack) together, in order of their lowest id."""
    groups: Dict[Tuple, List[int]] = {}
    for eid in sorted(states):
        groups.setdefault(_key(states[eid]), []).append(eid)
    return sorted(((ids, [states[i] for i in ids]) for ids in groups.values()),
                  key=lambda g: g[0][0])


def format_states(states: Dict[int, dict]) -> str:
    """One paragraph per group: ``rank 0: in `Comm.Barrier` at cell In[1] line 1 (...)``,
    ``ranks 1-3: idle``. Engine ids (= MPI rank plus the job's offset) name the ranks."""
    if not states:
        return "no engines registered"
    out: List[str] = []
    for ids, group in group_states(states):
        label = f"rank {ids[0]}" if len(ids) == 1 else f"ranks {ranges(ids)}"
        lines = _describe(group)
        if group[0].get("state") == "no answer":
            label = f"engine {ids[0]}" if len(ids) == 1 else f"engines {ranges(ids)}"
            lines = [("does" if len(ids) == 1 else "do") + " not answer where-requests "
                     "(a stock ipengine?)"]
        out.append(f"{label}: {lines[0]}")
        out.extend(lines[1:])
    stuck = [i for i, s in states.items() if s.get("interrupted_for") is not None]
    if stuck:
        who = f"rank {stuck[0]}" if len(stuck) == 1 else f"ranks {ranges(stuck)}"
        out.append(f"Interrupted but still busy: {who}. `pxcluster restart` recovers "
                   "with the same engine ids (`pxcluster stop` ends the cluster).")
    return "\n".join(out)


def where(profile: Optional[str] = None, profile_dir: Optional[str] = None,
          cluster_id: str = "", timeout: float = DEFAULT_TIMEOUT) -> Dict[int, dict]:
    """Connect to the cluster's controller with a stock client and collect every rank's state."""
    import ipyparallel as ipp

    from pxfabric.cluster import ClusterError, resolve_profile_dir

    pdir = Path(resolve_profile_dir(profile, profile_dir, create=False))
    name = f"ipcontroller-{cluster_id}-client.json" if cluster_id else "ipcontroller-client.json"
    url_file = pdir / "security" / name
    if not url_file.exists():
        raise ClusterError(f"no cluster here: {url_file} does not exist (pxcluster list shows "
                           "the running clusters)")
    try:
        rc = ipp.Client(str(url_file), timeout=timeout)
    except Exception as e:
        raise ClusterError(f"cannot connect to the controller of {url_file}: "
                           f"{type(e).__name__}: {e}") from None
    try:
        deadline = time.monotonic() + min(timeout, 2.0)
        while not rc.ids and time.monotonic() < deadline:  # registration notifications
            time.sleep(0.1)
        return collect(rc, timeout=timeout)
    finally:
        rc.close()
