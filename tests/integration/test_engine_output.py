"""Output of many ranks at once: nothing lost, nothing reordered within a rank.

One pxcontroller and ``mpirun -n 8 pxengine`` (oversubscribed on small machines), the stock
client reading stdout/stderr from its AsyncResults.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_job  # noqa: E402

N = 8
LINES = 10_000

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    yield from engine_job.module_job(tmp_path_factory, "output", N)


@pytest.fixture
def rc(job):
    c = job.client()
    yield c
    job.close_client(c)


def test_every_rank_prints_at_once(rc):
    dv = rc[:]
    ar = dv.execute(
        "from mpi4py import MPI\n"
        "me = MPI.COMM_WORLD.rank\n"
        "MPI.COMM_WORLD.Barrier()\n"
        f"for i in range({LINES}):\n"
        "    print(me, i, 'x' * (i % 37))\n"
    )
    ar.get(timeout=180)
    # The reply may overtake the last stream messages; the client waits for idle status.
    ar.wait_for_output(timeout=60)
    assert ar.engine_id == list(range(N))
    for eid, out in zip(ar.engine_id, ar.stdout):
        expected = "".join(f"{eid} {i} {'x' * (i % 37)}\n" for i in range(LINES))
        if out != expected:
            got = out.splitlines()
            first_bad = next((k for k, (a, b) in enumerate(zip(got, expected.splitlines()))
                              if a != b), min(len(got), LINES))
            pytest.fail(f"engine {eid}: {len(got)} of {LINES} lines, first difference at line "
                        f"{first_bad}: {got[first_bad:first_bad + 1]!r}")


def test_stdout_and_stderr_interleaved_per_stream(rc):
    dv = rc[:]
    ar = dv.execute(
        "import sys\n"
        "for i in range(2000):\n"
        "    print('o', i)\n"
        "    print('e', i, file=sys.stderr)\n"
    )
    ar.get(timeout=120)
    ar.wait_for_output(timeout=60)
    want_out = "".join(f"o {i}\n" for i in range(2000))
    want_err = "".join(f"e {i}\n" for i in range(2000))
    assert ar.stdout == [want_out] * N
    assert ar.stderr == [want_err] * N


def test_output_without_newline_and_unicode(rc):
    ar = rc[:].execute("import sys\nsys.stdout.write('ä€😀 no newline')\nprint('\\x00\\x1b[1m')")
    ar.get(timeout=60)
    ar.wait_for_output(timeout=30)
    assert ar.stdout == ["ä€😀 no newline\x00\x1b[1m\n"] * N
