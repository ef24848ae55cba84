"""``--nodb`` (stock's NoDB backend): the hub keeps no task records.

Work runs and results reach the client that submitted it as usual; the hub still knows which
tasks are pending or finished (``result_status(status_only=True)``); everything that needs a
stored record (get_result from another client, hub_history, db_query, resubmit) answers the
stock ``NoData`` error; purging is accepted. Same client code, same answers from both
controllers. The other spellings of the option are checked on pxcontroller alone.
"""

from __future__ import annotations

import subprocess

import pytest
from ipyparallel import RemoteError, interactive

from cluster import PXCONTROLLER, ProcessTracker, wait_until

ENGINES = 2
CONTROLLER_ARGS = ["--nodb"]

pytestmark = pytest.mark.timeout(150)


@interactive
def double(x):
    return 2 * x


@interactive
def nap(t):
    import time

    time.sleep(t)
    return t


def assert_no_data(excinfo):
    err = excinfo.value
    assert err.ename == "NoData", (err.ename, err.evalue)
    assert "NoDB backend doesn't store any data" in err.evalue


def hub_completed(rc, msg_ids, timeout=30):
    def done():
        try:
            st = rc.result_status(list(msg_ids), status_only=True)
        except RemoteError:  # the hub has not seen the request yet
            return False
        return not st["pending"] and sorted(st["completed"]) == sorted(msg_ids)

    wait_until(done, timeout, 0.05, f"the hub to report {len(msg_ids)} task(s) completed")


def test_work_runs_and_nothing_is_kept(cluster, rc):
    lview = rc.load_balanced_view()
    assert lview.map_sync(double, range(20)) == [2 * i for i in range(20)]
    direct = rc[1].apply_async(double, 21)
    assert direct.get(timeout=30) == 42
    ex = rc[:].execute("a = 5", block=True)
    assert ex.successful()
    assert rc[:].pull("a", block=True) == [5, 5]
    ids = [direct.msg_ids[0]] + list(ex.msg_ids)
    hub_completed(rc, ids)

    other = cluster.client()  # has none of the results locally
    try:
        with pytest.raises(RemoteError) as e:
            other.get_result(direct.msg_ids[0], block=True)
        assert_no_data(e)
        with pytest.raises(RemoteError) as e:
            other.hub_history()
        assert_no_data(e)
        with pytest.raises(RemoteError) as e:
            other.db_query({"msg_id": {"$ne": None}})
        assert_no_data(e)
        with pytest.raises(RemoteError) as e:
            other.resubmit(direct.msg_ids, block=True)
        assert_no_data(e)
        # Unknown ids are still unknown; status queries still answer
        with pytest.raises(RemoteError) as e:
            other.result_status(["no-such-task"], status_only=True)
        assert e.value.ename == "KeyError"
        other.purge_everything()
    finally:
        cluster.close_client(other)
    assert rc[0].apply_sync(double, 4) == 8  # and the cluster keeps working


def test_pending_is_reported_while_running(rc):
    slow = rc[0].apply_async(nap, 2.0)

    def pending():
        try:
            return rc.result_status(slow.msg_ids, status_only=True)["pending"] == slow.msg_ids
        except RemoteError:
            return False

    wait_until(pending, 20, 0.05, "the hub to report the task pending")
    assert slow.get(timeout=30) == 2.0
    hub_completed(rc, slow.msg_ids)


@pytest.mark.parametrize("flag, says", [
    ("--IPController.db_class=NoDB", "task records: none kept (NoDB)"),
    ("--HubFactory.db_class=ipyparallel.controller.dictdb.NoDB", "task records: none kept (NoDB)"),
    ("--IPController.db_class=DictDB", "task records: in memory (DictDB)"),
    ("--sqlitedb", "keeps task records in memory"),
])
def test_db_class_spellings(tmp_path, flag, says):
    if not PXCONTROLLER.is_file():
        pytest.skip("pxcontroller is not built")
    log = tmp_path / "controller.log"
    tracker = ProcessTracker()
    with open(log, "w") as f:
        proc = subprocess.Popen([str(PXCONTROLLER), f"--profile-dir={tmp_path}", "--ip=127.0.0.1", flag],
                                stdout=f, stderr=subprocess.STDOUT)
    tracker.add_popen(proc, "controller")
    try:
        wait_until(lambda: says in log.read_text(errors="replace") or proc.poll() is not None, 20, 0.05,
                   f"pxcontroller to log {says!r}")
        assert says in log.read_text(errors="replace"), log.read_text(errors="replace")
    finally:
        tracker.stop()


def test_bad_db_class_is_a_usage_error(tmp_path):
    if not PXCONTROLLER.is_file():
        pytest.skip("pxcontroller is not built")
    cmd = [str(PXCONTROLLER), f"--profile-dir={tmp_path}", "--IPController.db_class=NoSuchDB"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "unknown DB class 'NoSuchDB'" in res.stderr
