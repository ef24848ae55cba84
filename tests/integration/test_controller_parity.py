"""Stock parity of the hub's queries with the stock client: a controller without engines,
after every engine went away, and ipyparallel 9.1's task labels.

* With no engine registered (none yet, or all gone) stock answers ``queue_status`` (``{'unassigned':
  0}`` plus the ids it ever had, with their completed counts), ``ids``, ``hub_history``,
  ``db_query`` and ``shutdown(hub=True)``; ``rc[:]`` and ``%px`` fail in the client with
  ``NoEnginesRegistered``.
* ipyparallel 9.1's ``view.set_flags(label=...)`` puts ``label`` in a request's metadata and its
  hub keeps it as the record key ``label`` (None when unset). The 7.1 client here cannot set a
  label, so the tests add it to the metadata the client sends, as a 9.x client does. Stock 7.1's
  hub has no such key (``keys=['label']`` answers ``KeyError: 'label'``): those tests are
  ``xfail(strict)`` on stock.
"""

from __future__ import annotations

import contextlib

import pytest
from ipyparallel import RemoteError, interactive
from ipyparallel.error import NoEnginesRegistered

from cluster import wait_until

ENGINES = 2

pytestmark = pytest.mark.timeout(150)

STOCK_HAS_NO_LABELS = "stock 7.1's hub has no `label` record key (added in ipyparallel 9.1)"


@interactive
def echo(x):
    return x


@pytest.fixture
def one_per_controller(engine_kind):
    """Tests that start no engines need one run per controller kind, not per engine kind."""
    if engine_kind == "mpi":
        pytest.skip("no engines involved: covered by pxfabric-ipengine")


def _shell(tmp_path):
    """An IPython InteractiveShell singleton (history off, private profile) for ``%px``."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.core.profiledir import ProfileDir
    from traitlets.config import Config

    if InteractiveShell.initialized():
        InteractiveShell.clear_instance()
    config = Config()
    config.HistoryManager.enabled = False
    profile = ProfileDir.create_profile_dir(str(tmp_path / "ipython-profile"))
    return InteractiveShell.instance(config=config, profile_dir=profile)


def _assert_no_engines_in_client(rc, tmp_path):
    """``rc[:]`` and ``%px`` fail in the client, as with any controller without engines."""
    from IPython.core.interactiveshell import InteractiveShell

    assert rc.ids == []
    with pytest.raises(NoEnginesRegistered):
        rc[:]
    ip = _shell(tmp_path)
    try:
        rc.direct_view("all").activate()  # targets resolved per call
        with pytest.raises(NoEnginesRegistered):
            ip.run_line_magic("px", "a = 1")
    finally:
        InteractiveShell.clear_instance()


def test_no_engines_ever(make_cluster, one_per_controller, tmp_path):
    cluster = make_cluster(0)
    rc = cluster.client()
    assert rc.queue_status() == {"unassigned": 0}
    assert rc.queue_status(verbose=True) == {"unassigned": []}
    assert rc.hub_history() == []
    assert rc.db_query({"msg_id": {"$ne": ""}}) == []
    assert rc.result_status([]) == {"pending": [], "completed": []}
    _assert_no_engines_in_client(rc, tmp_path)
    # An explicit empty list of targets is stock's "No Engines Registered".
    reply = rc._send_recv(rc._query_stream, "queue_request", content={"targets": [], "verbose": False})
    assert (reply["content"]["status"], reply["content"]["ename"]) == ("error", "IndexError")
    procs = cluster.controller_processes()
    rc.shutdown(hub=True)
    assert cluster.controller.wait(timeout=30) == 0
    wait_until(lambda: not cluster.alive(procs), 20, 0.1, "all controller processes to exit")


def test_every_engine_went_away(make_cluster, tmp_path):
    cluster = make_cluster(ENGINES)  # MPI engines: one job
    rc = cluster.client()
    ids = sorted(rc.ids)
    lview = rc.load_balanced_view()

    def idle(qs):
        return all(qs[i]["queue"] == 0 and qs[i]["tasks"] == 0 for i in ids) and not qs["unassigned"]

    def settled():
        qs = rc.queue_status()
        return idle(qs) and qs

    def counted(n):
        qs = settled()
        return qs and sum(qs[i]["completed"] - start[i]["completed"] for i in ids) == n and qs

    start = wait_until(settled, 15, 0.1, "an idle queue_status")
    direct = rc[:].apply_async(echo, 1)
    assert direct.get(timeout=30) == [1] * ENGINES
    assert lview.map_sync(echo, range(4)) == list(range(4))
    before = wait_until(lambda: counted(ENGINES + 4), 15, 0.1, "the hub to count the tasks completed")
    history = rc.hub_history()

    engine_procs = cluster.engine_processes()
    cluster.tracker.stop(engine_procs)  # the whole job (SIGTERM, then SIGKILL)
    wait_until(lambda: rc.ids == [], 45, 0.1, "the client to drop every engine")

    # Stock keeps the ids it ever had, with their completed lists, after the engines left.
    after = rc.queue_status()
    assert after == {**{i: {"queue": 0, "completed": before[i]["completed"], "tasks": 0} for i in ids},
                     "unassigned": 0}
    verbose = rc.queue_status(verbose=True)
    assert set(verbose) == {*ids, "unassigned"}
    assert {i: len(verbose[i]["completed"]) for i in ids} == {i: before[i]["completed"] for i in ids}
    assert rc.hub_history() == history
    assert len(rc.db_query({"msg_id": {"$in": history}}, keys=["completed"])) == len(history)
    assert rc.get_result(direct.msg_ids).get(timeout=30) == [1] * ENGINES

    fresh = cluster.client()  # a client that connects after the job went away
    assert fresh.ids == []
    assert fresh.queue_status() == after
    _assert_no_engines_in_client(fresh, tmp_path)

    procs = cluster.controller_processes()
    rc.shutdown(hub=True)
    assert cluster.controller.wait(timeout=30) == 0
    wait_until(lambda: not cluster.alive(procs), 20, 0.1, "all controller processes to exit")


# --- task labels (ipyparallel 9.1)


@contextlib.contextmanager
def labelled(rc, label):
    """Requests made by ``rc`` meanwhile carry ``metadata['label']``, as a 9.x client's
    ``view.set_flags(label=...)`` / ``temp_flags(label=...)`` does. (The 7.1 client builds each
    message with ``session.msg`` in the caller's thread and sends it later on its IO thread.)"""
    make = rc.session.msg

    def msg_with_label(msg_type, *args, **kwargs):
        if msg_type in ("apply_request", "execute_request"):
            kwargs["metadata"] = dict(kwargs.get("metadata") or {}, label=label)
        return make(msg_type, *args, **kwargs)

    rc.session.msg = msg_with_label
    try:
        yield
    finally:
        del rc.session.msg  # the bound method again


def _hub_done(rc, msg_ids, timeout=30):
    def done():
        try:
            return not rc.result_status(list(msg_ids), status_only=True)["pending"]
        except RemoteError:  # not seen yet
            return False

    wait_until(done, timeout, 0.05, f"the hub to complete {len(msg_ids)} task(s)")


def test_labels_from_a_9x_request(rc, controller_kind, request):
    if controller_kind == "stock":
        request.applymarker(pytest.mark.xfail(strict=True, reason=STOCK_HAS_NO_LABELS))
    lview = rc.load_balanced_view()
    dview = rc[:]
    expected = {}
    with labelled(rc, "mylabel_map"):
        ar = lview.map_async(echo, range(4))
    expected.update(dict.fromkeys(ar.msg_ids, "mylabel_map"))
    with labelled(rc, "mylabel_apply"):
        ars = [dview.apply_async(echo, 1), lview.apply_async(echo, 2)]
    for a in ars:
        expected.update(dict.fromkeys(a.msg_ids, "mylabel_apply"))
    with labelled(rc, "mylabel_execute"):
        ex = dview.execute("labelled = 1")
    expected.update(dict.fromkeys(ex.msg_ids, "mylabel_execute"))
    plain = lview.apply_async(echo, 3)  # no label: the record's label is None
    for a in [ar, ex, plain, *ars]:
        a.get(timeout=30)
    _hub_done(rc, [*expected, *plain.msg_ids])

    # The 9.1 test suite's query (ipyparallel/tests/test_label.py).
    got = rc.db_query({"label": {"$nin": [""]}}, keys=["msg_id", "label"])
    by_id = {r["msg_id"]: r["label"] for r in got}
    assert all(set(r) == {"msg_id", "label"} for r in got)
    assert {m: by_id.get(m) for m in expected} == expected
    assert by_id[plain.msg_ids[0]] is None
    # Equality and $in on the label, as on any record key.
    mapped = rc.db_query({"label": "mylabel_map"}, keys=["queue"])
    assert sorted(r["msg_id"] for r in mapped) == sorted(ar.msg_ids)
    assert {r["queue"] for r in mapped} == {"task"}
    some = rc.db_query({"label": {"$in": ["mylabel_apply", "mylabel_execute"]}}, keys=["label"])
    assert sorted(r["msg_id"] for r in some) == sorted(
        m for m, label in expected.items() if label != "mylabel_map")
    # 9.1's $glob (fnmatch): wildcards, sets, no match on records without a label; a pattern
    # on a non-string key is the TypeError stock's fnmatch raises.
    globbed = rc.db_query({"label": {"$glob": "mylabel_[ae]*"}}, keys=["label"])
    assert sorted(r["msg_id"] for r in globbed) == sorted(
        m for m, label in expected.items() if label != "mylabel_map")
    assert len(rc.db_query({"label": {"$glob": "*"}}, keys=["label"])) == len(expected)
    with pytest.raises(RemoteError, match="expected str") as err:
        rc.db_query({"engine_uuid": {"$glob": 7}}, keys=["label"])
    assert err.value.ename == "TypeError"
    # A full record carries the label it was given; one without a label keeps stock 7.1's keys.
    (full,) = rc.db_query({"msg_id": ex.msg_ids[0]})
    assert full["label"] == "mylabel_execute"
    assert full["metadata"]["label"] == "mylabel_execute"
    (bare,) = rc.db_query({"msg_id": plain.msg_ids[0]})
    assert "label" not in bare
    rc.purge_everything()

