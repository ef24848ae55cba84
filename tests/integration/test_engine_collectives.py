"""Native collectives: a BroadcastView request for the ranks of one MPI job crosses the fabric
link as ONE message whatever the number of ranks, and coalescing replies come back as one.

Counted by pxcontroller itself (``pxf_stats_request`` on the registration socket)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import zmq
from ipyparallel import interactive
from jupyter_client.session import Session

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_job  # noqa: E402

N = 4


@interactive
def rank():
    from mpi4py import MPI

    return MPI.COMM_WORLD.rank


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    yield from engine_job.module_job(tmp_path_factory, "collectives", N)


@pytest.fixture
def rc(job):
    c = job.client()
    yield c
    job.close_client(c)


def controller_counters(job) -> dict:
    """The controller's message counters, asked over its registration socket."""
    info = json.loads((job.profile_dir / "security" / "ipcontroller-client.json").read_text())
    session = Session(key=info["key"].encode(), signature_scheme=info["signature_scheme"])
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(f"{info['interface']}:{info['registration']}")
        session.send(sock, "pxf_stats_request", content={})
        assert sock.poll(10_000), "no pxf_stats_reply within 10 s"
        _, msg = session.feed_identities(sock.recv_multipart())
        reply = session.deserialize(msg)
    finally:
        sock.close()
    assert reply["header"]["msg_type"] == "pxf_stats_reply"
    assert reply["content"]["status"] == "ok"
    return reply["content"]["counters"]


@pytest.mark.parametrize("coalescing", [True, False], ids=["coalescing", "per-engine"])
def test_one_fabric_message_per_broadcast(job, rc, coalescing):
    bv = rc.broadcast_view(is_coalescing=coalescing)
    bv.block = True
    assert sorted(bv.apply(rank)) == list(range(N))  # warm up; also checks the results

    before = controller_counters(job)
    reps = 3
    for _ in range(reps):
        assert sorted(bv.apply(rank)) == list(range(N))
    after = controller_counters(job)

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    # Requests: one fabric message per broadcast, not one per rank.
    assert delta("fabric.bcast_out") == reps
    if coalescing:
        # Replies gathered over MPI on rank 0 leave the job as one message per broadcast.
        assert delta("fabric.bcast_coalesced_in") == reps
        assert delta("fabric.bcast_in") == 0
    else:
        # The client expects one reply per engine.
        assert delta("fabric.bcast_in") == reps * N
