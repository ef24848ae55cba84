"""Readable output from many ranks: ``%load_ext pxfabric``, ``%pxg``/``%%pxg`` and
``pxfabric.show_grouped`` against 16 pxengine ranks (one pxcontroller, ``mpirun -n 16``),
driven by the stock client in a real IPython InteractiveShell."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from ipyparallel import CompositeError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "python"))
import engine_job  # noqa: E402

N = 16

pytestmark = pytest.mark.timeout(180)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EVENS = ",".join(str(i) for i in range(0, N, 2))
ODDS = ",".join(str(i) for i in range(1, N, 2))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    yield from engine_job.module_job(tmp_path_factory, "grouped", N)


@pytest.fixture(scope="module")
def rc(job):
    c = job.client()
    yield c
    job.close_client(c)


@pytest.fixture(scope="module")
def shell(rc, tmp_path_factory):
    """The InteractiveShell singleton (history off, private profile) with ``%px`` on all
    ranks, ``rank`` defined on every rank and ``%load_ext pxfabric`` done."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.core.profiledir import ProfileDir
    from traitlets.config import Config

    if InteractiveShell.initialized():
        InteractiveShell.clear_instance()
    config = Config()
    config.HistoryManager.enabled = False
    profile = ProfileDir.create_profile_dir(str(tmp_path_factory.mktemp("ipython-profile")))
    ip = InteractiveShell.instance(config=config, profile_dir=profile)
    dv = rc[:]
    dv.block = True
    dv.activate()
    dv.execute("from mpi4py import MPI\nrank = MPI.COMM_WORLD.rank", block=True)
    ip.run_line_magic("load_ext", "pxfabric")
    yield ip
    InteractiveShell.clear_instance()


PROGRESS = re.compile(r"^.*%pxg: .*tasks/s\]\n?", re.M)


def output(capsys):
    """(stdout, stderr) without colours and without the progress bar (stock's, shown when a
    cell takes longer than ``--progress-after``: the first traceback on 16 ranks may)."""
    captured = capsys.readouterr()
    out = PROGRESS.sub("", ANSI.sub("", captured.out).replace("\r", "\n"))
    return out.lstrip("\n"), ANSI.sub("", captured.err)


def labels(text: str, kind: str) -> list:
    return re.findall(rf"^\[{kind}:([0-9,\-]+)\]", text, re.M)


def test_pxg_two_values_from_sixteen_ranks(shell, rc, capsys):
    assert rc.ids == list(range(N))
    capsys.readouterr()
    shell.run_line_magic("pxg", "print(rank % 2)")
    out, err = output(capsys)
    assert out == f"[stdout:{EVENS}] 0\n[stdout:{ODDS}] 1\n"
    assert err == ""


def test_pxg_one_rank_differs(shell, capsys):
    capsys.readouterr()
    shell.run_line_magic("pxg", "print(7 if rank == 7 else 6)")
    out, _ = output(capsys)
    assert out == f"[stdout:0-6,8-{N - 1}] 6\n[stdout:7] 7\n"


def test_px_stays_stock(shell, capsys):
    capsys.readouterr()
    shell.run_line_magic("px", "print(rank % 2)")
    out, _ = output(capsys)
    # stock streams one block per rank, in arrival order
    assert sorted(int(i) for i in labels(out, "stdout")) == list(range(N))


def test_pxg_results_grouped(shell, capsys):
    capsys.readouterr()
    shell.run_line_magic("pxg", f"rank // {N // 2}")
    out, _ = output(capsys)
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert re.fullmatch(rf"Out\[0-{N // 2 - 1}:\d+\]: 0", lines[0]), out
    assert re.fullmatch(rf"Out\[{N // 2}-{N - 1}:\d+\]: 1", lines[1]), out


def test_pxg_errors_grouped(shell, capsys):
    capsys.readouterr()
    with pytest.raises(CompositeError) as excinfo:
        shell.run_cell_magic("pxg", "", "print('before')\n1/0")
    out, _ = output(capsys)
    assert out == f"[stdout:0-{N - 1}] before\n"
    lines = [ANSI.sub("", line) for line in excinfo.value.render_traceback()]
    assert lines.count(f"[0-{N - 1}:execute]: ") == 1
    assert sum("ZeroDivisionError: division by zero" in line for line in lines) == 1, lines
    assert str(excinfo.value).endswith(f"[0-{N - 1}:execute]: ZeroDivisionError: division by zero")


def test_pxg_error_as_ipython_shows_it(shell, capsys):
    """Through run_cell, as a user types it: IPython draws the grouped traceback."""
    capsys.readouterr()
    shell.run_cell("%pxg raise ValueError('rank %d' % (rank // 8))")
    out, _ = output(capsys)
    assert out.count(f"[0-{N // 2 - 1}:execute]: ") == 1, out
    assert out.count(f"[{N // 2}-{N - 1}:execute]: ") == 1, out
    assert out.count("ValueError: rank 0") == 1 and out.count("ValueError: rank 1") == 1, out


def test_cell_pxg_targets_range(shell, rc, capsys):
    capsys.readouterr()
    shell.run_cell_magic("pxg", "--targets 0-3", "print('hi')\nrank < 2")
    out, _ = output(capsys)
    lines = out.splitlines()
    assert lines[0] == "[stdout:0-3] hi", out
    assert re.fullmatch(r"Out\[0-1:\d+\]: True", lines[1]), out
    assert re.fullmatch(r"Out\[2-3:\d+\]: False", lines[2]), out
    assert len(lines) == 3, out
    # the view's own targets are back
    assert shell.run_line_magic("pxg", "rank") is None
    assert len(output(capsys)[0].splitlines()) == N


def test_cell_pxg_stock_targets_and_noblock(shell, capsys):
    capsys.readouterr()
    ar = shell.run_cell_magic("pxg", "--targets 4:8 --noblock -o pxg_ar",
                              "import sys\nprint(rank % 2, file=sys.stderr)")
    assert shell.user_ns["pxg_ar"] is ar
    ar.get(timeout=60)
    assert ar.engine_id == [4, 5, 6, 7]
    from pxfabric import show_grouped

    show_grouped(ar)
    out, err = output(capsys)
    assert out == ""
    assert err == "[stderr:4,6] 0\n[stderr:5,7] 1\n"


def test_show_grouped_on_an_async_result(rc, shell, capsys):
    import pxfabric

    ar = rc[:].execute("import sys\nprint('same')\nprint('err', rank // 4, file=sys.stderr)\n"
                       "if rank == 3: 1/0", block=False)
    with pytest.raises(CompositeError):
        ar.get(timeout=60)
    capsys.readouterr()
    groups = pxfabric.show_grouped(ar)
    out, err = output(capsys)
    assert labels(out, "stdout") == [f"0-{N - 1}"]
    assert err.splitlines() == [f"[stderr:{4 * k}-{4 * k + 3}] err {k}" for k in range(N // 4)]
    assert "[3:execute]: " in out and out.count("ZeroDivisionError: division by zero") == 1
    assert [g.ids for g in groups.errors] == [(3,)]


def test_display_data_once_per_bundle(shell, capsys):
    capsys.readouterr()
    shell.run_cell_magic(
        "pxg", "",
        "from IPython.display import display\n"
        "display({'text/plain': 'figure %d' % (rank % 2), 'image/png': 'AAAA'}, raw=True)")
    out, _ = output(capsys)
    assert out == f"[output:{EVENS}]\nfigure 0\n[output:{ODDS}]\nfigure 1\n"


def test_cell_pxg_single_engine(shell, capsys):
    from ipyparallel.error import RemoteError

    capsys.readouterr()
    shell.run_cell_magic("pxg", "--targets 3", "print('alone', rank)\nrank * 10")
    out, _ = output(capsys)
    assert re.fullmatch(r"\[stdout:3\] alone 3\nOut\[3:\d+\]: 30\n", out), out
    with pytest.raises(RemoteError, match="ZeroDivisionError"):
        shell.run_cell_magic("pxg", "--targets 3", "1/0")


def test_bad_target_range_is_a_usage_error(shell):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="engine id range '3-1'"):
        shell.run_cell_magic("pxg", "--targets 3-1", "pass")


def test_show_grouped_on_a_map_with_failures(rc, capsys):
    """A map's result reassembles items; the errors still belong to the engines that raised."""
    import pxfabric
    from ipyparallel import interactive

    @interactive  # defined in the engines' namespace, not imported from this test module
    def check(x):
        if x >= 12:
            raise ValueError("too big")
        return x

    ar = rc[:].map(check, range(N), block=False)
    with pytest.raises(CompositeError):
        ar.get(timeout=60)
    capsys.readouterr()
    groups = pxfabric.show_grouped(ar)
    assert [(g.ranges, g.value.ename, g.value.method) for g in groups.errors] == [
        (f"12-{N - 1}", "ValueError", "apply")]
