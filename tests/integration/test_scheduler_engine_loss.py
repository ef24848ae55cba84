"""Engine loss with load-balanced work: tasks with retries left go to another engine, the
others fail with EngineError, and tasks waiting for a target that is gone become impossible
(protocol §7.6). MPI engines run one job per engine here, so a kill takes only that engine."""

from __future__ import annotations

import os
import signal

import pytest
from ipyparallel import RemoteError, interactive

from cluster import wait_until

pytestmark = pytest.mark.timeout(180)


@interactive
def inc(x):
    return x + 1


@interactive
def gated(path, limit=120):
    """Writes this engine's pid to ``path + '.started.<n>'``, then waits for ``path``."""
    import os
    import time

    n = 0
    while os.path.exists(f"{path}.started.{n}"):
        n += 1
    with open(f"{path}.started.{n}", "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return "gate timeout"
        time.sleep(0.02)
    return os.getpid()


def engine_running(cluster, path, n=0):
    """The id of the engine that started the gated task at ``path`` (attempt ``n``)."""
    started = f"{path}.started.{n}"
    wait_until(lambda: os.path.exists(started) and open(started).read(), 30, what="the task to start")
    pid = int(open(started).read())
    return {p: i for i, p in cluster.engine_pids.items()}[pid]


def test_engine_loss_retries_or_fails(make_cluster, tmp_path):
    c = make_cluster(3, jobs=(1, 1, 1))
    rc = c.client()
    lview = rc.load_balanced_view()
    keep_going = str(tmp_path / "retried")
    give_up = str(tmp_path / "failed")
    with lview.temp_flags(retries=1):
        retried = lview.apply_async(gated, keep_going)
    r_engine = engine_running(c, keep_going)
    failed = lview.apply_async(gated, give_up)
    f_engine = engine_running(c, give_up)
    assert r_engine != f_engine
    # Waits for engine f_engine, which is busy (HWM 1): parked in the scheduler.
    stuck = rc.load_balanced_view(targets=[f_engine]).apply_async(gated, give_up)
    wait_until(lambda: rc.queue_status()["unassigned"] == 1, 15, 0.1, "the targeted task to wait")
    survivor = ({0, 1, 2} - {r_engine, f_engine}).pop()

    for victim in (r_engine, f_engine):
        c.engine_process(victim).send_signal(signal.SIGKILL)
    wait_until(lambda: rc.ids == [survivor], 45, 0.1, "the client to drop the dead engines")
    open(keep_going, "w").close()  # the retry runs through at once

    assert retried.get(timeout=60) == c.engine_pids[survivor]
    assert retried.engine_id == survivor
    assert engine_running(c, keep_going, 1) == survivor
    with pytest.raises(RemoteError) as excinfo:
        failed.get(timeout=60)
    assert excinfo.value.ename == "EngineError"
    assert "died" in excinfo.value.evalue
    with pytest.raises(RemoteError) as excinfo:
        stuck.get(timeout=60)
    assert excinfo.value.ename == "ImpossibleDependency"
    # the survivor keeps serving, and the hub has the outcomes
    assert lview.map_sync(inc, range(5)) == [1, 2, 3, 4, 5]
    st = rc.result_status(retried.msg_ids + failed.msg_ids + stuck.msg_ids)
    assert st["pending"] == []
