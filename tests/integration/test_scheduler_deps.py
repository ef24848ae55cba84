"""Load-balanced dependencies, timeouts and retries through the controller (stock client).

Every test expects the outcome the stock ipcontroller gives (protocol §7.4-7.6): `after` and
`follow` with all/any and success/failure, Dependency objects, @depend/@require, timeouts that
apply only while a task waits, retries with the failed engine left out, and the scheduler's own
errors (InvalidDependency, ImpossibleDependency, TaskTimeout).
"""

from __future__ import annotations

import os

import pytest
import ipyparallel as ipp
from ipyparallel import Dependency, RemoteError, interactive
from ipyparallel.client.asyncresult import AsyncResult

from cluster import wait_for_gate, wait_until

ENGINES = 4

pytestmark = pytest.mark.timeout(120)


@interactive
def ok(x=None):
    return x


@interactive
def fail(msg="planned failure"):
    raise ValueError(msg)


@interactive
def pid():
    import os

    return os.getpid()


@interactive
def attempt(path, fail_first):
    """Appends this engine's pid to ``path``; fails while fewer than ``fail_first`` attempts
    came before."""
    import os

    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(path) as f:
        n = len(f.read().split())
    if n <= fail_first:
        raise RuntimeError(f"attempt {n} fails")
    return os.getpid()


@interactive
def sleep_then(delay, value):
    import time

    time.sleep(delay)
    return value


@interactive
def append_tag(path, tag):
    with open(path, "a") as f:
        f.write(f"{tag}\n")
    return tag


def ename_of(ar, timeout=60):
    with pytest.raises(RemoteError) as excinfo:
        ar.get(timeout=timeout)
    return excinfo.value.ename


class Gate:
    """A task that blocks on an engine until released, submitted through a view."""

    def __init__(self, view, tmp_path, name="gate"):
        self.path = str(tmp_path / name)
        self.ar = view.apply_async(wait_for_gate, self.path, 60)

    def started(self, timeout=30):
        wait_until(lambda: os.path.exists(self.path + ".started"), timeout, what="the gate task to start")

    def release(self):
        open(self.path, "w").close()
        return self.ar.get(timeout=30)


@pytest.fixture
def lview(rc):
    return rc.load_balanced_view()


# ---------------------------------------------------------------- after (time dependencies)


def test_after_waits_for_its_dependency(rc, lview, tmp_path):
    gate = Gate(lview, tmp_path)
    gate.started()
    with lview.temp_flags(after=gate.ar):
        dep = lview.apply_async(ok, "after gate")
    assert not dep.ready()
    # (the queue request may overtake the task: different sockets)
    wait_until(lambda: rc.queue_status()["unassigned"] >= 1, 10, what="a task waiting in the scheduler")
    assert not dep.ready()
    assert gate.release() == "released"
    assert dep.get(timeout=30) == "after gate"
    assert dep.metadata["started"] >= gate.ar.metadata["completed"]


def test_after_a_finished_task_runs_at_once(lview):
    first = lview.apply_async(ok, 1)
    first.get(timeout=30)
    with lview.temp_flags(after=[first.msg_ids[0]]):
        assert lview.apply_async(ok, 2).get(timeout=30) == 2


def test_after_a_failed_task_is_impossible(lview):
    bad = lview.apply_async(fail)
    with pytest.raises(RemoteError):
        bad.get(timeout=30)
    with lview.temp_flags(after=bad):
        assert ename_of(lview.apply_async(ok, 1)) == "ImpossibleDependency"


def test_after_a_task_that_fails_later_is_impossible(lview, tmp_path):
    gate = Gate(lview, tmp_path)
    gate.started()
    bad = lview.apply_async(fail)  # may queue behind nothing: 3 engines are free
    with lview.temp_flags(after=[gate.ar, bad]):
        dep = lview.apply_async(ok, 1)
    assert ename_of(dep) == "ImpossibleDependency"
    gate.release()


def test_failure_only_dependency(lview):
    good = lview.apply_async(ok, 1)
    bad = lview.apply_async(fail)
    good.get(timeout=30)
    with pytest.raises(RemoteError):
        bad.get(timeout=30)
    on_failure = Dependency([bad], success=False, failure=True)
    with lview.temp_flags(after=on_failure):
        assert lview.apply_async(ok, "cleanup").get(timeout=30) == "cleanup"
    with lview.temp_flags(after=Dependency([good], success=False, failure=True)):
        assert ename_of(lview.apply_async(ok, 1)) == "ImpossibleDependency"
    # success or failure: anything finished will do
    with lview.temp_flags(after=Dependency([good, bad], success=True, failure=True)):
        assert lview.apply_async(ok, "either").get(timeout=30) == "either"


def test_any_dependency(lview):
    good = lview.apply_async(ok, 1)
    bad = lview.apply_async(fail)
    bad2 = lview.apply_async(fail)
    for ar in (bad, bad2):
        with pytest.raises(RemoteError):
            ar.get(timeout=30)
    good.get(timeout=30)
    with lview.temp_flags(after=Dependency([bad, good], all=False)):
        assert lview.apply_async(ok, "any").get(timeout=30) == "any"
    with lview.temp_flags(after=Dependency([bad, bad2], all=False)):
        assert ename_of(lview.apply_async(ok, 1)) == "ImpossibleDependency"
    with lview.temp_flags(after=Dependency([bad, good], all=True)):
        assert ename_of(lview.apply_async(ok, 1)) == "ImpossibleDependency"


def test_any_dependency_waits_for_the_first(lview, tmp_path):
    gate = Gate(lview, tmp_path)
    gate.started()
    bad = lview.apply_async(fail)
    with pytest.raises(RemoteError):
        bad.get(timeout=30)
    with lview.temp_flags(after=Dependency([bad, gate.ar], all=False)):
        dep = lview.apply_async(ok, "second one")
    assert not dep.ready()
    gate.release()
    assert dep.get(timeout=30) == "second one"


def test_dependency_as_dict_and_msg_id_strings(rc, lview):
    a = lview.apply_async(ok, "a")
    a.get(timeout=30)
    # The wire form of a Dependency (set_flags itself refuses dicts: a stock client bug).
    d = Dependency([a.msg_ids[0]], all=True, success=True, failure=False).as_dict()
    assert raw_submit(rc, lview, {"after": d}).get(timeout=30) == "raw"
    d = Dependency([a.msg_ids[0]], success=False, failure=True).as_dict()
    assert ename_of(raw_submit(rc, lview, {"follow": d})) == "ImpossibleDependency"
    with lview.temp_flags(after=a.msg_ids[0]):
        assert lview.apply_async(ok, "str").get(timeout=30) == "str"


# ---------------------------------------------------------------- follow (location dependencies)


def test_follow_runs_where_the_dependency_ran(rc, lview):
    for _ in range(3):
        first = lview.apply_async(pid)
        first.get(timeout=30)
        with lview.temp_flags(follow=first):
            second = lview.apply_async(pid)
        assert second.get(timeout=30) == first.get()
        assert second.engine_id == first.engine_id


def test_follow_waits_for_a_pending_dependency(rc, lview, tmp_path):
    gate = Gate(rc.load_balanced_view(targets=[2]), tmp_path)
    gate.started()
    with lview.temp_flags(follow=gate.ar):
        follower = lview.apply_async(pid)
    assert not follower.ready()
    gate.release()
    follower.get(timeout=30)
    assert follower.engine_id == 2


def test_follow_all_on_two_engines_is_impossible(rc, lview):
    a = rc.load_balanced_view(targets=[0]).apply_async(ok, "a")
    b = rc.load_balanced_view(targets=[1]).apply_async(ok, "b")
    a.get(timeout=30)
    b.get(timeout=30)
    with lview.temp_flags(follow=[a, b]):
        assert ename_of(lview.apply_async(ok, 1)) == "ImpossibleDependency"
    with lview.temp_flags(follow=Dependency([a, b], all=False)):
        ar = lview.apply_async(ok, "either engine")
        assert ar.get(timeout=30) == "either engine"
        assert ar.engine_id in (0, 1)


def test_follow_and_after_together(rc, lview):
    a = rc.load_balanced_view(targets=[3]).apply_async(ok, "a")
    b = lview.apply_async(ok, "b")
    with lview.temp_flags(follow=a, after=b):
        ar = lview.apply_async(ok, "both")
    assert ar.get(timeout=30) == "both"
    assert ar.engine_id == 3


def test_follow_with_targets_elsewhere_is_impossible(rc):
    a = rc.load_balanced_view(targets=[0]).apply_async(ok, "a")
    a.get(timeout=30)
    view = rc.load_balanced_view(targets=[1])
    with view.temp_flags(follow=a, timeout=3):
        # stock: not impossible (targets are registered), so it waits for its timeout
        assert ename_of(view.apply_async(ok, 1)) == "TaskTimeout"


# ---------------------------------------------------------------- invalid dependencies


def test_unknown_msg_id_is_invalid(lview):
    with lview.temp_flags(after=["no-such-msg-id"]):
        assert ename_of(lview.apply_async(ok, 1)) == "InvalidDependency"
    with lview.temp_flags(follow=["no-such-msg-id"]):
        assert ename_of(lview.apply_async(ok, 1)) == "InvalidDependency"


def test_direct_msg_id_is_invalid(rc, lview):
    direct = rc[0].apply_async(ok, 1)
    direct.get(timeout=30)
    with lview.temp_flags(after=direct):
        assert ename_of(lview.apply_async(ok, 1)) == "InvalidDependency"


def test_invalid_and_impossible_count_as_failures(lview):
    with lview.temp_flags(after=["no-such-msg-id"]):
        invalid = lview.apply_async(ok, 1)
    assert ename_of(invalid) == "InvalidDependency"
    with lview.temp_flags(after=Dependency([invalid], success=False, failure=True)):
        assert lview.apply_async(ok, "ran").get(timeout=30) == "ran"
    with lview.temp_flags(after=invalid):
        assert ename_of(lview.apply_async(ok, 1)) == "ImpossibleDependency"


def test_scheduler_error_shape(rc, lview):
    with lview.temp_flags(after=["no-such-msg-id"]):
        ar = lview.apply_async(ok, 1)
    with pytest.raises(RemoteError) as excinfo:
        ar.get(timeout=30)
    err = excinfo.value
    assert err.ename == "InvalidDependency"
    assert err.engine_info == {}
    assert "InvalidDependency" in err.traceback
    assert ar.metadata["engine_id"] is None
    # the controller is fine afterwards
    assert lview.apply_async(ok, 5).get(timeout=30) == 5


# ---------------------------------------------------------------- timeouts


def test_timeout_while_waiting(lview, tmp_path):
    gate = Gate(lview, tmp_path)
    gate.started()
    with lview.temp_flags(after=gate.ar, timeout=0.5):
        dep = lview.apply_async(ok, 1)
    assert ename_of(dep, timeout=30) == "TaskTimeout"
    # a dependent of the timed-out task is impossible
    with lview.temp_flags(after=dep):
        assert ename_of(lview.apply_async(ok, 1)) == "ImpossibleDependency"
    gate.release()


def test_timeout_does_not_apply_once_running(lview):
    with lview.temp_flags(timeout=0.3):
        ar = lview.apply_async(sleep_then, 1.5, "slow but fine")
    assert ar.get(timeout=30) == "slow but fine"


def test_timeout_met_in_time(lview, tmp_path):
    gate = Gate(lview, tmp_path)
    gate.started()
    with lview.temp_flags(after=gate.ar, timeout=30):
        dep = lview.apply_async(ok, "in time")
    gate.release()
    assert dep.get(timeout=30) == "in time"


def test_negative_timeout_fails_a_waiting_task_at_once(lview, tmp_path):
    gate = Gate(lview, tmp_path)
    gate.started()
    lview.timeout = -1.0  # set_flags refuses this; the trait itself takes it
    lview.after = gate.ar
    try:
        dep = lview.apply_async(ok, 1)
        lview.after = None
        ready_now = lview.apply_async(ok, "not waiting")
    finally:
        lview.timeout = 0.0
        lview.after = None
    assert ename_of(dep, timeout=10) == "TaskTimeout"
    assert ready_now.get(timeout=30) == "not waiting"
    gate.release()


# ---------------------------------------------------------------- retries


def test_retries_leave_the_failed_engines_out(lview, tmp_path):
    log = str(tmp_path / "attempts")
    with lview.temp_flags(retries=2):
        ar = lview.apply_async(attempt, log, 2)
    winner = ar.get(timeout=60)
    pids = open(log).read().split()
    assert len(pids) == 3
    assert len(set(pids)) == 3, "a retry went back to an engine that had failed it"
    assert int(pids[-1]) == winner


def test_retries_exhausted_relay_the_last_error(lview, tmp_path):
    log = str(tmp_path / "attempts")
    with lview.temp_flags(retries=1):
        ar = lview.apply_async(attempt, log, 10)
    with pytest.raises(RemoteError) as excinfo:
        ar.get(timeout=60)
    assert excinfo.value.ename == "RuntimeError"
    assert "attempt 2 fails" in excinfo.value.evalue
    assert len(open(log).read().split()) == 2


def test_retries_on_a_single_target_are_impossible(rc, tmp_path):
    log = str(tmp_path / "attempts")
    view = rc.load_balanced_view(targets=[1])
    with view.temp_flags(retries=3):
        ar = view.apply_async(attempt, log, 10)
    assert ename_of(ar) == "ImpossibleDependency"
    assert len(open(log).read().split()) == 1


def test_retries_beyond_the_engines_wait_then_time_out(lview, tmp_path):
    # Every engine failed it once: stock parks it (no engine left), so only a timeout ends it.
    log = str(tmp_path / "attempts")
    with lview.temp_flags(retries=ENGINES + 2, timeout=2):
        ar = lview.apply_async(attempt, log, 100)
    assert ename_of(ar, timeout=60) == "TaskTimeout"
    pids = open(log).read().split()
    assert len(pids) == ENGINES and len(set(pids)) == ENGINES


# ---------------------------------------------------------------- @depend / @require


@interactive
def on_engine_pid(wanted):
    import os

    return os.getpid() == wanted


def test_depend_decorator_picks_the_engine(rc, lview, cluster):
    wanted = cluster.engine_pids[2]

    @ipp.depend(on_engine_pid, wanted)
    @interactive
    def where():
        import os

        return os.getpid()

    for _ in range(3):
        ar = lview.apply_async(where)
        assert ar.get(timeout=60) == wanted
        assert ar.engine_id == 2


def test_depend_never_met_times_out(lview):
    @ipp.depend(on_engine_pid, -1)
    @interactive
    def never():
        return "ran"

    with lview.temp_flags(timeout=2):
        assert ename_of(lview.apply_async(never), timeout=60) == "TaskTimeout"


def test_depend_never_met_on_targets_is_impossible(rc):
    @ipp.depend(on_engine_pid, -1)
    @interactive
    def never():
        return "ran"

    view = rc.load_balanced_view(targets=[0, 3])
    assert ename_of(view.apply_async(never)) == "ImpossibleDependency"


def test_require(lview):
    @ipp.require("os", "json")
    @interactive
    def uses_modules():
        return json.dumps({"cwd": bool(os.getcwd())})  # noqa: F821 (imported by @require)

    assert lview.apply_async(uses_modules).get(timeout=60) == '{"cwd": true}'

    @ipp.require("no_such_module_pxfabric")
    @interactive
    def needs_missing():
        return "ran"

    with lview.temp_flags(timeout=2):
        assert ename_of(lview.apply_async(needs_missing), timeout=60) == "TaskTimeout"


# ---------------------------------------------------------------- ordering and DAGs


def stock_bug(request, controller_kind, reason):
    """Expect a failure on the stock controller only (strict: it must really fail there)."""
    if controller_kind == "stock":
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def test_waiting_tasks_run_in_submission_order(rc, tmp_path, request, controller_kind):
    # TaskScheduler.update_graph puts the tasks it could not run back with deque.extendleft,
    # which reverses them: stock runs 0, 7, 1, 2, ... here.
    stock_bug(request, controller_kind, "stock re-queues waiting tasks in reverse (deque.extendleft)")
    view = rc.load_balanced_view(targets=[1])
    gate = Gate(view, tmp_path)
    gate.started()
    log = str(tmp_path / "order")
    ars = []
    for i in range(8):
        with view.temp_flags(after=gate.ar):
            ars.append(view.apply_async(append_tag, log, i))
    gate.release()
    assert [ar.get(timeout=30) for ar in ars] == list(range(8))
    assert open(log).read().split() == [str(i) for i in range(8)]


def test_dag_from_the_documentation(rc, lview):
    """The DAG example of ipyparallel's docs (dagdeps): submit in topological order with
    after=parents, then check that every job started after all its parents completed."""
    import random

    rnd = random.Random(7)
    nodes = 24
    parents = {n: sorted(rnd.sample(range(n), min(n, rnd.randint(0, 3)))) for n in range(nodes)}
    results = {}
    for n in range(nodes):
        deps = [results[p] for p in parents[n]]
        with lview.temp_flags(after=deps):
            results[n] = lview.apply_async(sleep_then, rnd.random() * 0.05, n)
    for n, ar in results.items():
        assert ar.get(timeout=60) == n
    for n in range(nodes):
        started = results[n].metadata["started"]
        for p in parents[n]:
            assert started >= results[p].metadata["completed"], (n, p)


def test_map_with_dependencies(rc, lview):
    first = lview.map_async(ok, range(10))
    with lview.temp_flags(after=first):
        second = lview.map_async(ok, range(10, 20))
    assert list(second.get(timeout=60)) == list(range(10, 20))
    assert min(md["started"] for md in second.metadata) >= max(md["completed"] for md in first.metadata)


# ---------------------------------------------------------------- malformed metadata


def raw_submit(rc, view, metadata):
    """A task with exactly this metadata (the stock client validates what views send)."""
    md = dict(after=[], follow=[], timeout=None, targets=[], retries=0)
    md.update(metadata)
    future = rc.send_apply_request(view._socket, ok, ("raw",), {}, metadata=md)
    return AsyncResult(rc, future, fname="ok", targets=None, owner=True)


STUCK_ON_STOCK = "the stock TaskScheduler logs the exception and never answers the task"


@pytest.mark.parametrize(
    "metadata, ename",
    [
        ({"after": [123]}, "TypeError"),
        ({"follow": {"dependencies": "x", "success": False, "failure": False}}, "ValueError"),
        ({"timeout": "soon"}, "ValueError"),
        ({"retries": "many"}, "TypeError"),
    ],
    ids=["after-int", "follow-neither", "timeout-str", "retries-str"],
)
def test_malformed_metadata_gets_an_error_reply(rc, lview, request, controller_kind, metadata, ename):
    stock_bug(request, controller_kind, STUCK_ON_STOCK)
    ar = raw_submit(rc, lview, metadata)
    assert ename_of(ar, timeout=5) == ename
    assert lview.apply_async(ok, "still fine").get(timeout=30) == "still fine"


def test_raw_metadata_the_stock_client_never_sends(rc, lview, tmp_path):
    # A dependency spelled as one msg_id string, and a numeric timeout given as a string.
    first = lview.apply_async(ok, 1)
    first.get(timeout=30)
    assert raw_submit(rc, lview, {"after": first.msg_ids[0]}).get(timeout=30) == "raw"
    gate = Gate(lview, tmp_path)
    gate.started()
    ar = raw_submit(rc, lview, {"after": [gate.ar.msg_ids[0]], "timeout": "0.3"})
    assert ename_of(ar, timeout=30) == "TaskTimeout"
    gate.release()
