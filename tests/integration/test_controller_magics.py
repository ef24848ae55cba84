"""%px, %%px, %autopx and %pxresult through a real IPython InteractiveShell."""

from __future__ import annotations

import re

import pytest
from ipyparallel import CompositeError

ENGINES = 2

pytestmark = pytest.mark.timeout(90)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def shell(cluster, tmp_path_factory):
    """The InteractiveShell singleton, with history off and a private profile dir."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.core.profiledir import ProfileDir
    from traitlets.config import Config

    if InteractiveShell.initialized():
        InteractiveShell.clear_instance()
    config = Config()
    config.HistoryManager.enabled = False
    profile = ProfileDir.create_profile_dir(str(tmp_path_factory.mktemp("ipython-profile")))
    ip = InteractiveShell.instance(config=config, profile_dir=profile)
    yield ip
    InteractiveShell.clear_instance()


@pytest.fixture
def px(shell, rc):
    """An activated blocking DirectView on all engines; yields the shell."""
    dv = rc[:]
    dv.block = True
    dv.activate()
    yield shell
    magics = shell.magics_manager.registry.get("ParallelMagics")
    if magics is not None and getattr(magics, "_autopx", False):
        magics._disable_autopx()


def output(capsys) -> str:
    return ANSI.sub("", capsys.readouterr().out)


def stdout_blocks(text: str) -> dict:
    """``{engine_id: printed text}`` from ``[stdout:N]`` sections of %px output."""
    blocks = {}
    for m in re.finditer(r"\[stdout:(\d+)\]\s*(.*?)(?=\n\[|\nOut\[|\Z)", text, re.S):
        blocks[int(m.group(1))] = m.group(2).strip()
    return blocks


def test_px_line_magic(px, rc, capsys):
    px.run_line_magic("px", "mg_a = 6 * 7")
    assert rc[:].pull("mg_a", block=True) == [42] * ENGINES
    capsys.readouterr()
    px.run_line_magic("px", "print('value', mg_a)")
    assert stdout_blocks(output(capsys)) == {i: "value 42" for i in rc.ids}


def test_px_displays_results(px, rc, capsys):
    px.run_line_magic("px", "mg_r = 5")
    capsys.readouterr()
    px.run_line_magic("px", "mg_r * 3")
    text = output(capsys)
    for i in rc.ids:
        assert re.search(rf"Out\[{i}:\d+\]:\s*15", text), text


def test_px_cell_magic(px, rc, capsys):
    px.run_cell_magic("px", "", "mg_b = 40\nmg_b += 3\nprint('b is', mg_b)")
    assert stdout_blocks(output(capsys)) == {i: "b is 43" for i in rc.ids}
    px.run_cell_magic("px", "--targets 1", "print('only', 1)")
    assert stdout_blocks(output(capsys)) == {1: "only 1"}


def test_pxresult_after_noblock(px, rc, capsys):
    ar = px.run_cell_magic("px", "--noblock", "import time; time.sleep(0.2)\nprint('late')\n7 * 6")
    assert ar is not None
    ar.get(timeout=30)
    capsys.readouterr()
    px.run_line_magic("pxresult", "")
    text = output(capsys)
    assert stdout_blocks(text) == {i: "late" for i in rc.ids}
    for i in rc.ids:
        assert re.search(rf"Out\[{i}:\d+\]:\s*42", text), text


def test_autopx(px, rc, capsys):
    px.run_line_magic("autopx", "")
    assert "%autopx enabled" in output(capsys)
    px.run_cell("mg_z = 12 * 3")
    px.run_cell("print('auto', mg_z)")
    assert stdout_blocks(output(capsys)) == {i: "auto 36" for i in rc.ids}
    px.run_cell("%autopx")
    assert "%autopx disabled" in output(capsys)
    assert "mg_z" not in px.user_ns
    assert rc[:].pull("mg_z", block=True) == [36] * ENGINES


def test_px_remote_error(px, rc):
    with pytest.raises(CompositeError) as excinfo:
        px.run_line_magic("px", "1/0")
    text = ANSI.sub("", str(excinfo.value))
    for i in rc.ids:
        assert f"[{i}:execute]: ZeroDivisionError" in text
