"""pxengine under mpirun against pxcontroller, driven by the stock ipyparallel.Client.

Needs build/bin/{pxcontroller,pxengine} (or $PXF_BUILD_DIR/bin) and Open MPI.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from ipyparallel import interactive

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_job  # noqa: E402

N = 4


# Functions shipped to engines must not refer to this module (engines cannot import it).
@interactive
def mpi_rank():
    from mpi4py import MPI
    return MPI.COMM_WORLD.rank


@interactive
def double(x):
    return x * 2


@interactive
def square(x):
    return x * x


@interactive
def is_writeable(a):
    return a.flags.writeable


@interactive
def total(a):
    return float(a.sum())


@interactive
def divide_by_zero():
    return 1 / 0


@interactive
def const(v):
    return v


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    yield from engine_job.module_job(tmp_path_factory, "pxengine", N)


@pytest.fixture
def rc(job):
    c = job.client()
    yield c
    job.close_client(c)


@pytest.mark.timeout(60)
def test_ids_are_ranks(rc):
    assert rc.ids == list(range(N))
    ranks = rc[:].apply_sync(mpi_rank)
    assert ranks == list(range(N))


@pytest.mark.timeout(90)
def test_px_execute_mpi_collectives(rc):
    dv = rc[:]
    dv.block = True
    dv.execute(
        "from mpi4py import MPI\n"
        "import numpy as np\n"
        "comm = MPI.COMM_WORLD\n"
        "s = comm.allreduce(comm.rank)\n"
        "b = comm.bcast('hello' if comm.rank == 0 else None, root=0)\n"
        "comm.Barrier()\n"
        "a = np.full(8, comm.rank, dtype='d'); out = np.empty_like(a)\n"
        "comm.Allreduce(a, out, op=MPI.SUM)\n"
        "total = float(out[0])\n"
        "thread_level = MPI.Query_thread()\n"
    )
    assert dv["s"] == [sum(range(N))] * N
    assert dv["b"] == ["hello"] * N
    assert dv["total"] == [float(sum(range(N)))] * N
    assert dv["thread_level"] == [3] * N  # MPI_THREAD_MULTIPLE
    ar = dv.execute("print('rank', comm.rank)", silent=False, block=False)
    ar.get(timeout=30)
    ar.wait_for_output(timeout=10)
    assert [o.strip() for o in ar.stdout] == [f"rank {r}" for r in range(N)]


@pytest.mark.timeout(90)
def test_apply_push_pull_scatter_gather_numpy(rc):
    import numpy as np
    dv = rc[:]
    dv.block = True
    assert dv.apply(double, 21) == [42] * N
    dv.push({"v": np.arange(10.0)})
    pulled = dv.pull("v")
    for p in pulled:
        np.testing.assert_array_equal(p, np.arange(10.0))
    arr = np.arange(100, dtype="i8")
    dv.scatter("part", arr)
    back = dv.gather("part")
    np.testing.assert_array_equal(back, arr)
    # request buffers are writable on the engine, as on stock engines
    assert dv.apply(is_writeable, np.ones(1000)) == [True] * N
    big = np.random.rand(500_000)
    sums = dv.apply(total, big)
    assert all(abs(s - float(big.sum())) < 1e-6 for s in sums)


@interactive
def part_sum():
    return float(part.sum())  # noqa: F821 (the engine's namespace)


@interactive
def max_rss_kib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@interactive
def several_buffers(seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    # big and small buffers interleaved: bulk frames (>= 64 KiB) leave the MPI packet and
    # follow it as their own messages; small ones stay inside
    return [rng.random(200_000), np.arange(7), rng.integers(0, 255, 3_000_000, dtype="u1"), b"x" * 100]


@pytest.mark.timeout(90)
def test_large_messages_cross_mpi_intact(rc):
    import numpy as np
    dv = rc[:]
    dv.block = True
    # request direction: a 24 MB scatter and a 1.6 MB push to every rank, checked on the ranks
    arr = np.random.default_rng(1).random(3_000_000)
    dv.scatter("part", arr)
    sums = dv.apply(part_sum)
    assert abs(sum(sums) - float(arr.sum())) < 1e-6
    back = dv.gather("part")
    np.testing.assert_array_equal(back, arr)
    # reply direction, several big and small buffers in one reply, from every rank
    for rank, got in enumerate(dv.apply(several_buffers, 5)):
        want = several_buffers(5)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])
        assert got[3] == want[3], rank
    # the zero-copy reply buffers are released: big replies do not pile up on the ranks
    before = dv.apply(max_rss_kib)
    for _ in range(40):
        dv.apply(const, np.ones(2_000_000))  # 16 MB out and back
    grown = [b - a for a, b in zip(before, dv.apply(max_rss_kib))]
    assert max(grown) < 200_000, grown  # KiB; kept, 40 replies would be 640 MB per rank


@pytest.mark.timeout(60)
def test_status_reaches_clients_while_a_cell_runs(job, rc):
    # A rank holds a request's status messages for its reply (one fabric round per request),
    # but no longer than its fabric thread's 100 ms timeout: `busy` arrives while the cell runs.
    import json as _json
    import zmq
    from jupyter_client.session import Session

    info = _json.loads((job.profile_dir / "security" / "ipcontroller-client.json").read_text())
    session = Session(key=info["key"].encode(), signature_scheme=info["signature_scheme"])
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"{info['interface']}:{info['iopub']}")
    try:
        time.sleep(1.0)  # the subscription reaches the controller's PUB
        t0 = time.monotonic()
        ar = rc[1].execute("import time; time.sleep(3)", block=False)
        seen = []
        while not ar.ready() and time.monotonic() - t0 < 2.5:
            if not sub.poll(100):
                continue
            _, frames = session.feed_identities(sub.recv_multipart())
            msg = session.deserialize(frames)
            if msg["parent_header"].get("msg_id") == ar.msg_ids[0]:
                seen.append((msg["header"]["msg_type"], msg["content"].get("execution_state")))
                if seen[-1] == ("status", "busy"):
                    break
        assert seen and seen[-1] == ("status", "busy"), seen
        assert time.monotonic() - t0 < 2.0  # not held until the reply (3 s)
        assert not ar.ready()
        ar.get(timeout=30)
    finally:
        sub.close()
        ctx.term()


@pytest.mark.timeout(90)
def test_load_balanced_map(rc):
    lv = rc.load_balanced_view()
    assert lv.map_sync(square, range(32)) == [x * x for x in range(32)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("coalescing", [False, True])
def test_broadcast_view(rc, coalescing):
    bv = rc.broadcast_view(is_coalescing=coalescing)
    ar = bv.apply_async(mpi_rank)
    assert sorted(ar.get(timeout=30)) == list(range(N))
    bv.execute("bv_x = 5", block=True)
    assert rc[:].pull("bv_x", block=True) == [5] * N


@pytest.mark.timeout(60)
def test_remote_errors(rc):
    import ipyparallel as ipp
    dv = rc[:]
    with pytest.raises(ipp.error.CompositeError) as info:
        dv.apply_sync(divide_by_zero)
    assert len(info.value.elist) == N
    assert all(e[0] == "ZeroDivisionError" for e in info.value.elist)
    with pytest.raises(ipp.error.CompositeError):
        dv.execute("raise ValueError('boom')", block=True)
    assert dv.apply_sync(const, "still fine") == ["still fine"] * N


@pytest.mark.timeout(90)
def test_interrupt_all_ranks(rc):
    import ipyparallel as ipp
    dv = rc[:]
    ar = dv.execute("import time\nwhile True:\n    time.sleep(0.01)\n", block=False)
    time.sleep(2.0)
    assert not ar.ready()
    rc.send_signal(signal.SIGINT, targets=rc.ids, block=True)
    with pytest.raises(ipp.error.CompositeError) as info:
        ar.get(timeout=30)
    assert all(e[0] == "KeyboardInterrupt" for e in info.value.elist)
    assert dv.apply_sync(const, 7) == [7] * N


@pytest.mark.timeout(120)
def test_shutdown_leaves_no_process(tmp_path):
    j = engine_job.EngineJob(tmp_path, 2)
    try:
        j.start_or_fail()
        rc = j.client()
        rc.shutdown(targets="all", block=True)
        code = j.wait_job(timeout=60)
        assert code == 0, j.logs()
        j.tracker.refresh()
        assert j.engine_processes() == []
    finally:
        killed = j.stop()
    assert not killed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["controller-exits", "controller-killed"])
def test_job_ends_when_the_controller_goes(tmp_path, sig):
    """SIGTERM: the controller's pxf_shutdown ends the job at once, exit 0. SIGKILL: the job's
    heart thread misses 10 replies (250 ms pings) and the job ends with exit code 1."""
    j = engine_job.EngineJob(tmp_path, 2)
    j.engine_extra = ["--IPEngine.max_heartbeat_misses=10"]  # stock default 50: 12.5 s here
    try:
        j.start_or_fail()
        t0 = time.monotonic()
        j.controller.send_signal(sig)
        code = j.wait_job(timeout=60)
        took = time.monotonic() - t0
        log = j.engine_log.read_text(errors="replace")
        if sig == signal.SIGTERM:
            assert code == 0, j.logs()
            assert "controller asked the job to shut down" in log
            assert took < 10
        else:
            assert code == 1, j.logs()
            assert "lost the controller" in log
        j.tracker.refresh()
        assert j.engine_processes() == []
    finally:
        j.stop()


@pytest.mark.timeout(120)
def test_shell_options_reach_the_ipython_shell(tmp_path):
    """``--InteractiveShell.colors=nocolor`` (ipyparallel's test suite starts engines with it)
    configures every rank's shell as stock's ipengine does: plain tracebacks, and no
    "ignoring unsupported option" warning; other classes' options are still reported."""
    from ipyparallel import RemoteError
    j = engine_job.EngineJob(tmp_path, 2)
    j.engine_extra = ["--InteractiveShell.colors=nocolor", "--IPKernelApp.unknown_trait=1"]
    try:
        j.start_or_fail()
        rc = j.client()
        assert rc[:].apply_sync(_shell_colors) == ["NoColor", "NoColor"]
        with pytest.raises(RemoteError) as err:
            rc[0].execute("1/0", block=True)
        tb = "\n".join(err.value.traceback if isinstance(err.value.traceback, list)
                       else [err.value.traceback or ""])
        assert "ZeroDivisionError" in tb and "\x1b[" not in tb, tb
        j.close_client(rc)
        log = j.engine_log.read_text(errors="replace")
        assert "ignoring unsupported option --IPKernelApp.unknown_trait=1" in log
        assert "InteractiveShell.colors" not in log
    finally:
        j.stop()


@interactive
def _shell_colors():
    return get_ipython().colors  # noqa: F821  (the engine's shell)


@pytest.mark.timeout(60)
def test_singleton_without_mpirun(tmp_path):
    j = engine_job.EngineJob(tmp_path, 1)
    try:
        j.start_controller()
        env = dict(j.env)
        j.job = j._popen([str(engine_job.PXENGINE), f"--profile-dir={j.profile_dir}"],
                         j.engine_log, "engine", env=env)
        rc = j.client()
        rc.wait_for_engines(1, timeout=40)
        assert rc.ids == [0]
        assert rc[0].apply_sync(double, 21) == 42
        rc.shutdown(targets=0, block=True)
        assert j.wait_job(timeout=30) == 0, j.logs()
    finally:
        j.stop()


@pytest.mark.timeout(60)
def test_stock_connection_file_is_refused(tmp_path):
    import json
    import subprocess
    sec = tmp_path / "profile" / "security"
    sec.mkdir(parents=True)
    (sec / "ipcontroller-engine.json").write_text(json.dumps({
        "registration": 5001, "control": 5002, "mux": 5003, "task": 5004, "iopub": 5005,
        "hb_ping": 5006, "hb_pong": 5007, "broadcast": [5008], "key": "k", "location": "",
        "ssh": "", "interface": "tcp://127.0.0.1", "signature_scheme": "hmac-sha256",
        "pack": "json", "unpack": "json"}))
    env = dict(os.environ, **engine_job.MPI_ENV)
    p = subprocess.run([str(engine_job.PXENGINE), f"--profile-dir={tmp_path / 'profile'}"],
                       capture_output=True, text=True, timeout=50, env=env)
    assert p.returncode != 0
    assert "not a pxcontroller" in p.stderr


@pytest.mark.timeout(30)
def test_unknown_option_is_a_usage_error():
    import subprocess
    p = subprocess.run([str(engine_job.PXENGINE), "--frobnicate"], capture_output=True, text=True,
                       timeout=20)
    assert p.returncode == 2
    assert "--frobnicate" in p.stderr


@pytest.mark.timeout(90)
def test_wrong_key_is_reported(tmp_path):
    import json
    import subprocess
    j = engine_job.EngineJob(tmp_path, 1)
    try:
        j.start_controller()
        info = json.loads((j.profile_dir / "security" / "ipcontroller-engine.json").read_text())
        info["key"] = "not-the-key"
        bad = tmp_path / "bad-engine.json"
        bad.write_text(json.dumps(info))
        p = subprocess.run([str(engine_job.PXENGINE), f"--file={bad}", "--IPEngine.timeout=3"],
                           capture_output=True, text=True, timeout=60, env=j.env)
        assert p.returncode != 0
        assert "key" in p.stderr and "registration" in p.stderr, p.stderr
    finally:
        j.stop()


@pytest.mark.timeout(90)
def test_connection_info_from_environment(tmp_path):
    j = engine_job.EngineJob(tmp_path, 2)
    try:
        j.start_controller()
        env = dict(j.env)
        env["IPP_CONNECTION_INFO"] = (j.profile_dir / "security" / "ipcontroller-engine.json").read_text()
        argv = [engine_job.mpirun(), "-n", "2", str(engine_job.PXENGINE), "--profile-dir=/nonexistent"]
        j.job = j._popen(argv, j.engine_log, "engine", env=env)
        rc = j.client()
        rc.wait_for_engines(2, timeout=60)
        assert rc[:].apply_sync(double, 2) == [4, 4]
        rc.shutdown(targets="all", block=True)
        assert j.wait_job(timeout=60) == 0, j.logs()
    finally:
        j.stop()


@interactive
def chatter(n):
    import sys
    for i in range(n):
        print(f"line {i}")
        sys.stdout.flush()  # one IOPub message (and one ring of rank 0) per line
    return n


@pytest.mark.timeout(240)
@pytest.mark.parametrize("doorbells", ["rung", "polling"])
def test_ranks_woken_by_rings_or_polling(tmp_path, doorbells):
    """Both ways of waking a rank (doorbells.hpp) carry every kind of traffic: direct requests,
    broadcasts (Ibcast, relayed through ranks), bulk frames, and bursts of messages to rank 0
    faster than its ring queue (10 datagrams) drains."""
    import numpy as np
    j = engine_job.EngineJob(tmp_path, N)
    j.engine_extra = ["--log-level=10"]  # the doorbell summary is a debug line of rank 0
    if doorbells == "polling":
        j.env["PXF_FABRIC_DOORBELLS"] = "0"
    try:
        j.start_or_fail()
        rc = j.client()
        dv = rc[:]
        dv.block = True
        for _ in range(20):
            assert dv.apply(mpi_rank) == list(range(N))
        bv = rc.broadcast_view()
        for _ in range(20):
            assert sorted(bv.apply_sync(mpi_rank)) == list(range(N))
        arr = np.arange(2_000_000, dtype="i8")
        dv.scatter("x", arr)
        np.testing.assert_array_equal(dv.gather("x"), arr)
        ar = dv.apply_async(chatter, 300)
        assert ar.get(timeout=120) == [300] * N
        ar.wait_for_output(timeout=60)  # output may trail the replies (other socket), as on stock
        for out in ar.stdout:
            assert out.splitlines() == [f"line {i}" for i in range(300)]
        want = f"doorbells: {N if doorbells == 'rung' else 0} of {N} ranks woken by rings"
        assert want in j.engine_log.read_text(), j.logs()
    finally:
        j.stop()
