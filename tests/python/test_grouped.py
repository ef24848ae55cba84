"""Grouped output of many ranks (pxfabric/grouped.py): grouping, id ranges, rendering.

Synthetic outputs only, no processes (tests/integration/test_grouped_output.py runs ``%pxg``
against a real cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pxfabric import grouped
from pxfabric.grouped import EngineOutput, ErrorInfo, Group

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"

ZERO_DIV_TB = ("Traceback (most recent call last):\n  Cell In[3], line 1\n    1/0\n"
               "ZeroDivisionError: division by zero")


def zero_div():
    return ErrorInfo("ZeroDivisionError", "division by zero", ZERO_DIV_TB, "execute")


def text(pieces, stream=None):
    return "".join(t for s, t in pieces if stream is None or s == stream)


@pytest.mark.parametrize("ids, expected", [
    ([], ""),
    ([3], "3"),
    ([0, 1, 2, 3, 4, 5, 6, 8, 9, 63], "0-6,8-9,63"),
    ([5, 1, 2, 2, 0], "0-2,5"),
    (list(range(0, 16, 2)), "0,2,4,6,8,10,12,14"),
    ([7, 8], "7-8"),
])
def test_format_ranges(ids, expected):
    assert grouped.format_ranges(ids) == expected


def test_parse_ranges_inverts_format_ranges():
    ids = [0, 1, 2, 3, 4, 5, 6, 8, 10, 11, 63]
    assert grouped.parse_ranges(grouped.format_ranges(ids)) == ids
    assert grouped.parse_ranges(" 0-3 , 5") == [0, 1, 2, 3, 5]
    for bad in ("0-", "a", "3-1", "1,,2"):
        with pytest.raises(ValueError, match="engine id"):
            grouped.parse_ranges(bad)


def test_sixteen_ranks_two_values():
    records = [EngineOutput(i, stdout=f"{i % 2}\n") for i in range(16)]
    g = grouped.group_outputs(records)
    assert g.stdout == [Group(tuple(range(0, 16, 2)), "0\n"), Group(tuple(range(1, 16, 2)), "1\n")]
    assert g.stderr == g.displays == g.results == g.errors == []
    assert text(grouped.render_text(g)) == ("[stdout:0,2,4,6,8,10,12,14] 0\n"
                                           "[stdout:1,3,5,7,9,11,13,15] 1\n")


def test_one_rank_differs():
    records = [EngineOutput(i, stdout="6\n" if i != 7 else "7\n") for i in range(64)]
    g = grouped.group_outputs(records)
    assert [(x.ranges, x.value) for x in g.stdout] == [("0-6,8-63", "6\n"), ("7", "7\n")]
    assert text(grouped.render_text(g)) == "[stdout:0-6,8-63] 6\n[stdout:7] 7\n"


def test_groups_follow_first_engine_id_whatever_the_input_order():
    records = [EngineOutput(i, stdout="b" if i in (1, 5) else "a") for i in (5, 3, 1, 0)]
    g = grouped.group_outputs(records)
    assert [(x.ids, x.value) for x in g.stdout] == [((0, 3), "a"), ((1, 5), "b")]


def test_multiline_text_goes_below_its_label():
    g = grouped.group_outputs([EngineOutput(i, stdout="x\ny\n") for i in range(4)])
    assert text(grouped.render_text(g)) == "[stdout:0-3]\nx\ny\n"


def test_differing_stderr_goes_to_stderr():
    records = [EngineOutput(i, stdout="same\n", stderr=f"warning {i // 2}\n") for i in range(4)]
    g = grouped.group_outputs(records)
    pieces = grouped.render_text(g)
    assert text(pieces, "stdout") == "[stdout:0-3] same\n"
    assert text(pieces, "stderr") == "[stderr:0-1] warning 0\n[stderr:2-3] warning 1\n"
    # kinds in order: stdout before stderr
    assert [s for s, _ in pieces] == ["stdout", "stderr", "stderr"]


def test_ranks_without_output_are_in_no_group():
    records = [EngineOutput(i, stdout="hi\n" if i < 2 else "") for i in range(4)]
    assert [x.ids for x in grouped.group_outputs(records).stdout] == [(0, 1)]


def test_identical_errors_once_with_their_ranks():
    records = [EngineOutput(i, stdout="before\n", error=zero_div()) for i in range(15)]
    records.append(EngineOutput(15, error=ErrorInfo("NameError", "name 'x' is not defined")))
    g = grouped.group_outputs(records)
    assert [(x.ranges, x.value.ename) for x in g.errors] == [("0-14", "ZeroDivisionError"),
                                                             ("15", "NameError")]
    out = text(grouped.render_text(g))
    assert out.count("ZeroDivisionError: division by zero") == 1
    assert out.index("[stdout:0-14] before") < out.index("[0-14:execute]: ")
    assert "[15:execute]: \nNameError: name 'x' is not defined" in out
    assert grouped.error_summary(g.errors) == (
        "[0-14:execute]: ZeroDivisionError: division by zero\n"
        "[15:execute]: NameError: name 'x' is not defined")


def test_errors_differing_only_in_cell_number_or_colour_are_one_group():
    tb4 = ZERO_DIV_TB.replace("Cell In[3]", "Cell \x1b[0;32mIn [4], line 1\x1b[0m")
    tb5 = ZERO_DIV_TB.replace("Cell In[3]", "Cell In [5], line 1")
    records = [EngineOutput(i, error=ErrorInfo("ZeroDivisionError", "division by zero",
                                               tb4 if i < 4 else tb5)) for i in range(8)]
    records.append(EngineOutput(8, error=ErrorInfo("ZeroDivisionError", "division by zero",
                                                   tb5.replace("1/0", "2/0"))))
    g = grouped.group_outputs(records)
    assert [x.ranges for x in g.errors] == ["0-7", "8"]
    assert g.errors[0].value.traceback == tb4


def test_many_distinct_errors_past_the_limit_get_one_line_each():
    errors = [Group((i,), ErrorInfo("ValueError", f"rank {i}", f"tb {i}")) for i in range(6)]
    lines = grouped.error_lines(errors, tb_limit=2)
    assert lines == ["[0:execute]: ", "tb 0", "", "[1:execute]: ", "tb 1", "",
                     "... 4 more distinct exceptions ...",
                     "[2:execute]: ValueError: rank 2", "[3:execute]: ValueError: rank 3",
                     "[4:execute]: ValueError: rank 4", "[5:execute]: ValueError: rank 5"]


def test_results_grouped_by_value_and_execution_count():
    def result(value, count):
        return {"data": {"text/plain": value}, "metadata": {}, "execution_count": count}

    records = [EngineOutput(i, execute_result=result("15", 5)) for i in range(4)]
    records.append(EngineOutput(4, execute_result=result("15", 6)))
    records.append(EngineOutput(5, execute_result=result("[1,\n 2]", 5)))
    records.append(EngineOutput(6))  # no result (statement)
    g = grouped.group_outputs(records)
    assert text(grouped.render_text(g)) == ("Out[0-3:5]: 15\n" "Out[4:6]: 15\n"
                                           "Out[5:5]: \n[1,\n 2]\n")


def test_display_data_once_per_mime_bundle():
    fig_a = {"data": {"image/png": "AAAA", "text/plain": "<Figure A>"}, "metadata": {}}
    fig_a_reordered = {"metadata": {"x": 1}, "data": {"text/plain": "<Figure A>", "image/png": "AAAA"}}
    fig_b = {"data": {"image/png": "BBBB", "text/plain": "<Figure A>"}, "metadata": {}}
    records = [EngineOutput(0, outputs=(fig_a,)), EngineOutput(1, outputs=(fig_a_reordered,)),
               EngineOutput(2, outputs=(fig_b, fig_a))]
    g = grouped.group_outputs(records)
    # same text/plain but different PNG: two figures
    assert [x.ids for x in g.displays] == [(0, 1, 2), (2,)]
    assert text(grouped.render_text(g)) == "[output:0-2] <Figure A>\n[output:2] <Figure A>\n"
    assert text(grouped.render_text(g, result_only=True)) == ""


def test_order_of_kinds():
    records = [EngineOutput(i, stdout="o", stderr="e",
                            outputs=({"data": {"text/plain": "d"}, "metadata": {}},),
                            execute_result={"data": {"text/plain": "r"}, "execution_count": 1},
                            error=zero_div()) for i in range(2)]
    out = text(grouped.render_text(grouped.group_outputs(records)))
    order = [out.index(s) for s in ("[stdout:0-1]", "[stderr:0-1]", "[output:0-1]",
                                    "Out[0-1:1]", "[0-1:execute]")]
    assert order == sorted(order)


def test_single_rank():
    g = grouped.group_outputs([EngineOutput(3, stdout="only\n")])
    assert text(grouped.render_text(g)) == "[stdout:3] only\n"


def test_empty():
    g = grouped.group_outputs([])
    assert grouped.render_text(g) == []
    assert grouped.format_ranges([]) == ""


class FinishedResult:
    """The AsyncResult attributes show_grouped reads, for a finished multi-engine result."""
    _single_result = False

    def __init__(self, records, results):
        self.engine_id = [r.engine_id for r in records]
        self.stdout = [r.stdout for r in records]
        self.stderr = [r.stderr for r in records]
        self.outputs = [list(r.outputs) for r in records]
        self.execute_result = [r.execute_result for r in records]
        self._results = results

    def wait(self, timeout=-1):
        return True

    def ready(self):
        return True

    def wait_for_output(self, timeout=-1):
        return True

    def get(self, return_exceptions=False):
        return self._results


def test_show_grouped_outside_ipython(capsys):
    from ipyparallel.error import RemoteError

    records = [EngineOutput(i, stdout=f"{i % 2}\n") for i in range(4)]
    errors = [RemoteError("ZeroDivisionError", "division by zero", ZERO_DIV_TB,
                          {"engine_id": i, "method": "execute"}) for i in range(4)]
    grouped.show_grouped(FinishedResult(records, errors))
    out = capsys.readouterr().out
    assert out == ("[stdout:0,2] 0\n[stdout:1,3] 1\n[0-3:execute]: \n" + ZERO_DIV_TB + "\n\n")


def test_grouped_composite_error_draws_each_error_once():
    from ipyparallel.error import CompositeError

    from pxfabric.magics import GroupedCompositeError

    elist = [("ZeroDivisionError", "division by zero", ZERO_DIV_TB,
              {"engine_id": i, "method": "execute"}) for i in range(8)]
    e = GroupedCompositeError("one or more exceptions raised in: execute", elist)
    assert isinstance(e, CompositeError)
    assert e.render_traceback() == ["[0-7:execute]: "] + ZERO_DIV_TB.splitlines() + [""]
    assert str(e).endswith("\n[0-7:execute]: ZeroDivisionError: division by zero")
    assert e.render_traceback(3)[0] == "[3:execute]: "  # one engine's, as stock


def test_importing_pxfabric_stays_light():
    code = (f"import sys; sys.path.insert(0, {str(PYTHON_DIR)!r})\n"
            "import pxfabric\n"
            "heavy = [m for m in ('IPython', 'ipyparallel', 'pxfabric.grouped', 'pxfabric.magics')"
            " if m in sys.modules]\n"
            "f = pxfabric.show_grouped\n"
            "print(heavy, f.__module__, callable(pxfabric.load_ipython_extension),"
            " 'IPython' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[] pxfabric.grouped True False"
