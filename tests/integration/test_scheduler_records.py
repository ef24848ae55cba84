"""Task records through the hub (stock client): get_result from another client, hub_history,
db_query with the DictDB operators, purge_results, resubmit, and the record/size limits.

The stock hub learns of results asynchronously (monitor messages), so tests wait until the hub
reports a task completed before they look at its record.
"""

from __future__ import annotations

import datetime

import numpy as np
import pytest
from ipyparallel import RemoteError, interactive
from ipyparallel.serialize import deserialize_object

from cluster import wait_until

ENGINES = 4

pytestmark = pytest.mark.timeout(150)


@interactive
def echo(x):
    return x


@interactive
def shout(tag):
    print("out", tag)
    return tag.upper()


@interactive
def fail(msg):
    raise ValueError(msg)


@interactive
def big(n):
    import numpy

    return numpy.ones(n)


def hub_done(rc, msg_ids, timeout=30):
    """Waits until the hub has every one of ``msg_ids`` completed."""

    def done():
        try:
            st = rc.result_status(list(msg_ids), status_only=True)
        except RemoteError:  # not seen yet: the query overtook the task
            return False
        return not st["pending"]

    wait_until(done, timeout, 0.05, f"the hub to complete {len(msg_ids)} task(s)")


@pytest.fixture
def lview(rc):
    return rc.load_balanced_view()


def test_get_result_from_a_second_client(cluster, rc, lview):
    lb = lview.apply_async(shout, "lb")
    direct = rc[2].apply_async(shout, "direct")
    bad = lview.apply_async(fail, "stored failure")
    assert lb.get(timeout=30) == "LB" and direct.get(timeout=30) == "DIRECT"
    with pytest.raises(RemoteError):
        bad.get(timeout=30)
    ids = {"lb": lb.msg_ids[0], "direct": direct.msg_ids[0], "bad": bad.msg_ids[0]}
    engine_of = {"lb": lb.engine_id, "direct": 2}
    hub_done(rc, ids.values())
    cluster.close_client(rc)  # the submitting client is gone

    rc2 = cluster.client()
    try:
        for name in ("lb", "direct"):
            ar = rc2.get_result(ids[name])
            assert ar.get(timeout=30) == name.upper()
            assert ar.engine_id == engine_of[name]
            md = ar.metadata
            assert md["status"] == "ok"
            assert isinstance(md["completed"], datetime.datetime)
            assert isinstance(md["submitted"], datetime.datetime)
            wait_until(lambda: "out" in (rc2.get_result(ids[name]).stdout or ""), 10,
                       what="stdout in the record")
        with pytest.raises(RemoteError) as excinfo:
            rc2.get_result(ids["bad"]).get(timeout=30)
        assert excinfo.value.ename == "ValueError"
        assert excinfo.value.evalue == "stored failure"
        with pytest.raises(RemoteError) as excinfo:
            rc2.get_result("no-such-msg-id").get(timeout=30)
        assert excinfo.value.ename == "KeyError"
        st = rc2.result_status(list(ids.values()))
        assert sorted(st["completed"]) == sorted(ids.values()) and st["pending"] == []
    finally:
        cluster.close_client(rc2)


def test_hub_history_in_submission_order(rc, lview):
    ars = [lview.apply_async(echo, i) for i in range(6)] + [rc[1].apply_async(echo, "d")]
    for ar in ars:
        ar.get(timeout=30)
    mine = [ar.msg_ids[0] for ar in ars]
    hub_done(rc, mine)
    history = rc.hub_history()
    assert all(isinstance(m, str) for m in history)
    positions = [history.index(m) for m in mine]
    assert positions == sorted(positions)


def _completed_records(rc, ids, keys=None):
    hub_done(rc, ids)
    return rc.db_query({"msg_id": {"$in": list(ids)}}, keys=keys)


def test_db_query_records(rc, lview):
    ars = [lview.apply_async(echo, i) for i in range(4)]
    d = rc[3].apply_async(echo, "direct")
    for ar in ars + [d]:
        ar.get(timeout=30)
    ids = [ar.msg_ids[0] for ar in ars] + [d.msg_ids[0]]
    recs = _completed_records(rc, ids)
    assert sorted(r["msg_id"] for r in recs) == sorted(ids)
    by_id = {r["msg_id"]: r for r in recs}
    for ar in ars:
        r = by_id[ar.msg_ids[0]]
        assert r["queue"] == "task"
        assert r["engine_uuid"] == rc._engines[ar.engine_id]
        assert r["client_uuid"] == rc.session.session
        assert r["header"]["msg_id"] == ar.msg_ids[0]
        assert r["result_header"]["msg_type"] == "apply_reply"
        assert r["result_content"]["status"] == "ok"
        for key in ("submitted", "started", "completed", "received"):
            assert isinstance(r[key], datetime.datetime), key
        assert r["submitted"] <= r["completed"]
        assert "buffers" not in r and "result_buffers" not in r
    assert by_id[d.msg_ids[0]]["queue"] == "mux"
    assert by_id[d.msg_ids[0]]["engine_uuid"] == rc._engines[3]


def test_db_query_keys_and_buffers(rc, lview):
    arr = np.arange(3000, dtype=np.float64)
    ar = lview.apply_async(echo, arr)
    np.testing.assert_array_equal(ar.get(timeout=30), arr)
    msg_id = ar.msg_ids[0]
    (rec,) = _completed_records(rc, [msg_id], keys=["queue", "result_buffers", "buffers"])
    assert set(rec) == {"msg_id", "queue", "result_buffers", "buffers"}
    assert rec["queue"] == "task"
    out, _ = deserialize_object([bytes(b) for b in rec["result_buffers"]])
    np.testing.assert_array_equal(out, arr)
    assert len(rec["buffers"]) >= 3  # the pickled function, args and kwargs
    (rec,) = rc.db_query({"msg_id": msg_id}, keys="engine_uuid")
    assert set(rec) == {"msg_id", "engine_uuid"}
    with pytest.raises(RemoteError) as excinfo:
        rc.db_query({"msg_id": msg_id}, keys=["no_such_key"])
    assert excinfo.value.ename == "KeyError"


def test_db_query_operators(rc, lview):
    ars = [lview.apply_async(echo, i) for i in range(6)]
    bad = lview.apply_async(fail, "x")
    for ar in ars:
        ar.get(timeout=30)
    with pytest.raises(RemoteError):
        bad.get(timeout=30)
    ids = [ar.msg_ids[0] for ar in ars]
    recs = _completed_records(rc, ids + bad.msg_ids, keys=["completed", "engine_uuid"])
    done = {r["msg_id"]: r["completed"] for r in recs}
    times = sorted(done[m] for m in ids)
    mid = times[2]
    scope = {"msg_id": {"$in": ids}}

    def q(**tests):
        query = dict(scope)
        query.update(tests)
        return sorted(r["msg_id"] for r in rc.db_query(query, keys=["completed"]))

    assert q(completed={"$lt": mid}) == sorted(m for m in ids if done[m] < mid)
    assert q(completed={"$lte": mid}) == sorted(m for m in ids if done[m] <= mid)
    assert q(completed={"$gte": mid}) == sorted(m for m in ids if done[m] >= mid)
    assert q(completed={"$eq": mid}) == sorted(m for m in ids if done[m] == mid)
    assert q(completed={"$ne": mid}) == sorted(m for m in ids if done[m] != mid)
    assert q(completed={"$gte": times[0], "$lte": times[-1]}) == sorted(ids)
    assert q(msg_id={"$in": ids, "$nin": ids[:2]}) == sorted(ids[2:])  # replaces the scope
    assert q(msg_id={"$in": ids[1:3]}) == sorted(ids[1:3])
    assert q(queue="task") == sorted(ids)
    assert q(queue="mux") == []
    assert q(resubmitted=None) == sorted(ids)
    assert q(completed={"$ne": None}) == sorted(ids)
    some_engine = rc._engines[ars[0].engine_id]
    assert q(engine_uuid=some_engine) == sorted(m for m, ar in zip(ids, ars) if ar.engine_id == ars[0].engine_id)
    failed = rc.db_query({"result_content": {"$ne": None}, "msg_id": bad.msg_ids[0]}, keys=["result_content"])
    assert failed[0]["result_content"]["ename"] == "ValueError"


STOCK_EQUALITY_BUG = (
    "DictDB._match builds `lambda o: o == v` in a loop: every plain-value test compares with the "
    "query's last value, so {key: value, other: ...} matches nothing"
)


def test_db_query_equality_then_more_keys(rc, lview, request, controller_kind):
    if controller_kind == "stock":
        request.applymarker(pytest.mark.xfail(strict=True, reason=STOCK_EQUALITY_BUG))
    ar = lview.apply_async(echo, 1)
    ar.get(timeout=30)
    hub_done(rc, ar.msg_ids)
    got = rc.db_query({"msg_id": ar.msg_ids[0], "queue": {"$eq": "task"}}, keys=["queue"])
    assert [r["msg_id"] for r in got] == ar.msg_ids


def test_db_query_gt(rc, lview, request, controller_kind):
    if controller_kind == "stock":
        # dictdb.filters['$gt'] is `lambda a, b: b > a`, i.e. less-than.
        request.applymarker(pytest.mark.xfail(strict=True, reason="stock DictDB's $gt compares backwards"))
    ars = [lview.apply_async(echo, i) for i in range(4)]
    for ar in ars:
        ar.get(timeout=30)
    ids = [ar.msg_ids[0] for ar in ars]
    recs = _completed_records(rc, ids, keys=["completed"])
    times = sorted(r["completed"] for r in recs)
    got = rc.db_query({"msg_id": {"$in": ids}, "completed": {"$gt": times[1]}}, keys=["completed"])
    assert sorted(r["completed"] for r in got) == [t for t in times if t > times[1]]


def test_db_query_bad_queries(rc, lview):
    ar = lview.apply_async(echo, 1)
    ar.get(timeout=30)
    (msg_id,) = ar.msg_ids
    hub_done(rc, [msg_id])
    with pytest.raises(RemoteError) as excinfo:
        rc.db_query({"msg_id": {"$regex": "x"}})
    assert excinfo.value.ename == "KeyError"
    with pytest.raises(RemoteError) as excinfo:
        rc.db_query({"msg_id": {"$in": [msg_id]}, "completed": {"$lt": 5}})
    assert excinfo.value.ename == "TypeError"
    with pytest.raises(RemoteError) as excinfo:
        rc.db_query({"msg_id": {"$eq": msg_id}, "queue": {"$in": 5}})
    assert excinfo.value.ename == "TypeError"
    with pytest.raises(RemoteError) as excinfo:
        rc.db_query(["not", "a", "dict"])
    assert excinfo.value.ename == "AttributeError"
    # the hub still answers
    assert [r["msg_id"] for r in rc.db_query({"msg_id": msg_id}, keys=["queue"])] == [msg_id]


def test_purge_results(cluster, rc, lview, tmp_path):
    from cluster import wait_for_gate

    keep = lview.apply_async(echo, "keep")
    drop = lview.apply_async(echo, "drop")
    keep.get(timeout=30)
    drop.get(timeout=30)
    hub_done(rc, keep.msg_ids + drop.msg_ids)
    rc.purge_results(drop)
    history = rc.hub_history()
    assert drop.msg_ids[0] not in history and keep.msg_ids[0] in history
    assert rc.db_query({"msg_id": drop.msg_ids[0]}) == []
    rc2 = cluster.client()
    try:
        with pytest.raises(RemoteError) as excinfo:
            rc2.get_result(drop.msg_ids[0]).get(timeout=30)
        assert excinfo.value.ename == "KeyError"
        assert rc2.get_result(keep.msg_ids[0]).get(timeout=30) == "keep"
    finally:
        cluster.close_client(rc2)

    # a pending task cannot be purged
    gate = str(tmp_path / "gate")
    pending = lview.apply_async(wait_for_gate, gate, 60)
    def hub_sees_it():
        try:
            return rc.result_status(pending.msg_ids)["pending"]
        except RemoteError:  # the query overtook the task (different sockets)
            return False

    wait_until(hub_sees_it, 10, what="the hub to see the task")
    with pytest.raises(RemoteError) as excinfo:
        rc.purge_hub_results(pending)
    assert excinfo.value.ename == "IndexError"
    assert "msg pending" in excinfo.value.evalue
    open(gate, "w").close()
    assert pending.get(timeout=30) == "released"


def _three_tasks(rc):
    on0 = rc[0].apply_async(echo, 0)
    on1 = rc[1].apply_async(echo, 1)
    lb0 = rc.load_balanced_view(targets=[0]).apply_async(echo, "lb0")
    for ar in (on0, on1, lb0):
        ar.get(timeout=30)
    ids = on0.msg_ids + on1.msg_ids + lb0.msg_ids
    hub_done(rc, ids)
    return on0, on1, lb0, ids


def test_purge_by_engine(rc, request, controller_kind):
    if controller_kind == "stock":
        # purge_results drops dict(engine_uuid=uid, completed={'$ne': None}): see above.
        request.applymarker(pytest.mark.xfail(strict=True, reason=STOCK_EQUALITY_BUG))
    on0, on1, lb0, ids = _three_tasks(rc)
    rc.purge_hub_results(targets=[0])
    left = {r["msg_id"] for r in rc.db_query({"msg_id": {"$in": ids}}, keys=["queue"])}
    assert left == set(on1.msg_ids)


def test_purge_everything(rc):
    on0, on1, lb0, ids = _three_tasks(rc)
    rc.purge_everything()
    assert rc.db_query({"msg_id": {"$in": ids}}) == []
    assert rc.history == []
    assert not set(ids) & set(rc.hub_history())


def test_resubmit(cluster, rc, lview):
    ar = lview.apply_async(shout, "again")
    d = rc[1].apply_async(echo, "direct once")
    assert ar.get(timeout=30) == "AGAIN" and d.get(timeout=30) == "direct once"
    hub_done(rc, ar.msg_ids + d.msg_ids)
    again = rc.resubmit(ar)
    assert again.msg_ids != ar.msg_ids
    assert again.get(timeout=60) == ["AGAIN"]  # an AsyncHubResult of a list of msg_ids
    twice = rc.resubmit(d.msg_ids)  # a direct task goes through the task scheduler
    assert twice.get(timeout=60) == ["direct once"]
    (old,) = rc.db_query({"msg_id": ar.msg_ids[0]}, keys=["resubmitted"])
    assert old["resubmitted"] == again.msg_ids[0]
    hub_done(rc, again.msg_ids)
    (new,) = rc.db_query({"msg_id": again.msg_ids[0]}, keys=["queue", "header", "client_uuid"])
    assert new["queue"] == "task"
    assert new["header"]["msg_type"] == "apply_request"
    assert new["client_uuid"] == rc.session.session
    # another client can read the resubmission's result
    rc2 = cluster.client()
    try:
        assert rc2.get_result(again.msg_ids[0]).get(timeout=30) == "AGAIN"
        assert rc2.get_result(twice.msg_ids[0]).get(timeout=30) == "direct once"
    finally:
        cluster.close_client(rc2)
    with pytest.raises(RemoteError) as excinfo:
        rc.resubmit(["no-such-msg-id"])
    assert excinfo.value.ename == "KeyError"


@interactive
def scaled(a, k):
    return a * k


def test_large_buffers_in_records_survive(cluster, rc, lview):
    # Buffers of 1 MiB or more: records first share the frames, then swap in private copies
    # made on another thread (pxcontroller); the hub must serve the same bytes either way.
    a = np.random.default_rng(7).random(400_000)  # 3.2 MB request buffer, 3.2 MB result
    ar = lview.apply_async(scaled, a, 3.0)
    np.testing.assert_array_equal(ar.get(timeout=30), a * 3.0)
    hub_done(rc, ar.msg_ids)
    rc2 = cluster.client()
    try:
        for _ in range(3):  # before and after the copies are swapped in
            np.testing.assert_array_equal(rc2.get_result(ar.msg_ids[0]).get(timeout=30), a * 3.0)
    finally:
        cluster.close_client(rc2)
    again = rc.resubmit(ar)  # the request's buffers, from the record
    np.testing.assert_array_equal(again.get(timeout=60)[0], a * 3.0)


def test_identical_large_buffers_kept_apart_from_different_ones(cluster, rc, lview, controller_kind):
    # pxcontroller keeps a large buffer identical to a recent one once (a push to every engine
    # carries the same array N times); one that differs only in the middle must stay itself.
    rng = np.random.default_rng(11)
    a = rng.random(300_000)  # 2.4 MB
    b = a.copy()
    b[150_000] += 1.0  # same size, same first and last pages
    sent = (a, a, b, a)
    ars = [lview.apply_async(echo, x) for x in sent]
    for ar, x in zip(ars, sent):
        np.testing.assert_array_equal(ar.get(timeout=30), x)
    hub_done(rc, [ar.msg_ids[0] for ar in ars])
    if controller_kind == "pxfabric":  # a's request and result, twice more each, are shared
        wait_until(lambda: cluster.query("pxf_stats_request", {}, 10)["content"]["counters"]
                   .get("record_buffers.shared_identical", 0) >= 4, 10, what="the copies to be made")
    rc2 = cluster.client()
    try:
        for ar, x in zip(ars, sent):  # result buffers from the records
            np.testing.assert_array_equal(rc2.get_result(ar.msg_ids[0]).get(timeout=30), x)
    finally:
        cluster.close_client(rc2)
    for ar, x in zip(ars, sent):  # request buffers from the records
        np.testing.assert_array_equal(rc.resubmit(ar).get(timeout=60)[0], x)


def test_resubmit_a_failed_task_fails_again(rc, lview):
    ar = lview.apply_async(fail, "twice")
    with pytest.raises(RemoteError):
        ar.get(timeout=30)
    hub_done(rc, ar.msg_ids)
    with pytest.raises(RemoteError) as excinfo:
        rc.resubmit(ar).get(timeout=60)
    assert excinfo.value.ename == "ValueError"


# ---------------------------------------------------------------- limits


def test_record_limit(make_cluster):
    c = make_cluster(2, args=["--DictDB.record_limit=20"])
    rc = c.client()
    lview = rc.load_balanced_view()
    ars = [lview.apply_async(echo, i) for i in range(120)]
    assert [ar.get(timeout=60) for ar in ars] == list(range(120))
    hub_done(rc, ars[-1].msg_ids)
    history = wait_until(lambda: (lambda h: h if len(h) <= 20 else None)(rc.hub_history()), 10,
                         what="the history to be culled")
    assert len(history) >= 10
    assert ars[-1].msg_ids[0] in history
    assert ars[0].msg_ids[0] not in history
    rc2 = c.client()
    assert rc2.get_result(ars[-1].msg_ids[0]).get(timeout=30) == 119
    with pytest.raises(RemoteError) as excinfo:
        rc2.get_result(ars[0].msg_ids[0]).get(timeout=30)
    assert excinfo.value.ename == "KeyError"


def test_size_limit(make_cluster):
    # ~80 kB per result: a 400 kB limit keeps a handful of records.
    c = make_cluster(2, args=["--DictDB.size_limit=400000"])
    rc = c.client()
    lview = rc.load_balanced_view()
    ars = [lview.apply_async(big, 10000) for _ in range(30)]
    for ar in ars:
        assert ar.get(timeout=60).shape == (10000,)
    hub_done(rc, ars[-1].msg_ids)
    history = rc.hub_history()
    kept = [ar for ar in ars if ar.msg_ids[0] in history]
    assert 1 <= len(kept) <= 6, len(kept)
    assert ars[-1] in kept
    rc2 = c.client()
    assert rc2.get_result(ars[-1].msg_ids[0]).get(timeout=30).shape == (10000,)
