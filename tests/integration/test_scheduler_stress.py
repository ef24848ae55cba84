"""Scheduler stress: tens of thousands of tiny load-balanced tasks with a mix of dependencies
complete, and pxcontroller's memory stays bounded by the record limit.

pxcontroller with stock engines runs 6,000 tasks (PXF_STRESS_TASKS overrides; 20,000 and more
work, they only take longer); with MPI engines, whose scheduler path is the same, 4,500
(PXF_STRESS_TASKS_MPI); the stock ipcontroller, which is much slower per task, 3,600 of the same
mix (PXF_STRESS_TASKS_STOCK), so the suite stays within CI time on 2 cores. Every third of a run
is more than the record limit (1,000), so culling and the bounded memory are exercised.
The mix, per batch (all submitted before any is awaited, so most tasks wait in the scheduler):
  plain map | after 3 tasks of the previous batch | after any of (a failure, a success) |
  follow one task of the previous batch | after a failed task with failure=True
"""

from __future__ import annotations

import os
import time

import pytest
from ipyparallel import Dependency, RemoteError, interactive

pytestmark = pytest.mark.timeout(900)

RECORD_LIMIT = 1000


@interactive
def inc(x):
    return x + 1


@interactive
def boom(x):
    raise ValueError(x)


def total_tasks(kind, engine_kind="ipengine"):
    if kind == "stock":
        return int(os.environ.get("PXF_STRESS_TASKS_STOCK", "3600"))
    if engine_kind == "mpi":
        return int(os.environ.get("PXF_STRESS_TASKS_MPI", "4500"))
    return int(os.environ.get("PXF_STRESS_TASKS", "6000"))


def run_batches(rc, n_tasks, batch, first_seq=0):
    """Submits n_tasks in batches of `batch` with the dependency mix; returns (maps, fails)."""
    lview = rc.load_balanced_view()
    maps, fails = [], []
    prev = None
    for k in range(n_tasks // batch):
        kind = k % 5
        values = range(first_seq + k * batch, first_seq + (k + 1) * batch)
        flags = {}
        if prev is not None and kind == 1:
            flags["after"] = prev.msg_ids[:3]
        elif prev is not None and kind == 2:
            bad = lview.apply_async(boom, k)
            fails.append(bad)
            flags["after"] = Dependency([bad.msg_ids[0], prev.msg_ids[-1]], all=False)
        elif prev is not None and kind == 3:
            flags["follow"] = prev.msg_ids[:1]
        elif prev is not None and kind == 4:
            bad = lview.apply_async(boom, k)
            fails.append(bad)
            flags["after"] = Dependency([bad.msg_ids[0]], success=False, failure=True)
        with lview.temp_flags(**flags):
            ar = lview.map_async(inc, values, chunksize=1)
        maps.append((values, ar))
        prev = ar
    return maps, fails


def check(maps, fails, timeout):
    deadline = time.monotonic() + timeout
    for values, ar in maps:
        assert ar.get(timeout=max(1, deadline - time.monotonic())) == [v + 1 for v in values]
    for bad in fails:
        with pytest.raises(RemoteError):
            bad.get(timeout=max(1, deadline - time.monotonic()))


def controller_rss(cluster):
    return sum(p.memory_info().rss for p in cluster.alive(cluster.controller_processes()))


def test_stress_mixed_dependencies(make_cluster, controller_kind, engine_kind):
    n = total_tasks(controller_kind, engine_kind)
    batch = 1000 if n >= 10000 else 250
    c = make_cluster(4, args=[f"--DictDB.record_limit={RECORD_LIMIT}"])
    rc = c.client()
    # Three equal rounds: memory after the second and after the third must be about the same.
    third = (n // 3) // batch * batch
    t0 = time.monotonic()
    rss = []
    for r in range(3):
        size = third if r < 2 else n - 2 * third
        maps, fails = run_batches(rc, size, batch, first_seq=r * third)
        check(maps, fails, 600)
        # Memory in use includes the iopub backlog queued for the (slower) client: let it drain
        # (every task's output has reached the client), then pxcontroller trims its heap after
        # a second of idleness.
        for _, ar in maps:
            ar.wait_for_output(timeout=300)
        for bad in fails:
            bad.wait_for_output(timeout=300)
        time.sleep(1)
        if controller_kind == "pxfabric":
            # The heap freed by the drained queues goes back to the system now (pxcontroller
            # does this by itself after a burst of tasks, but the drain came later).
            c.query("pxf_stats_request", {"trim": True}, 10)
        rss.append(controller_rss(c))
        # The client keeps every result; forget them (the controller's memory is what we watch).
        rc.purge_local_results("all")
    elapsed = time.monotonic() - t0
    print(f"\n{controller_kind}: {n} tasks in {elapsed:.1f}s ({n / elapsed:.0f}/s); controller RSS "
          f"after each third: {', '.join(f'{x / 2**20:.1f}' for x in rss)} MiB")
    rss_half, rss_end = rss[1], rss[2]

    history = rc.hub_history()
    assert len(history) <= RECORD_LIMIT
    assert maps[-1][1].msg_ids[-1] in history  # the newest are kept, the oldest culled
    assert maps[0][1].msg_ids[0] not in history
    if controller_kind == "pxfabric":
        stats = c.query("pxf_stats_request", {}, 10)["content"]
        assert stats["records"] <= RECORD_LIMIT
        assert stats["waiting"] == 0 and stats["in_flight"] == 0
        assert stats["dependency_graph"] == 0
        # Records are bounded; what grows is only the outcome of each task (about a hundred
        # bytes with the engine's completed list that queue_status reports).
        assert rss_end - rss_half < 16 * 2**20, rss
