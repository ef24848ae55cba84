"""Figures from engines with the stock client: ``%matplotlib inline``, ``display(fig)``,
``%pylab inline`` (ipyparallel's own ``test_magic_pylab`` and ``test_px_pylab``) and
``%matplotlib agg`` with ``savefig``, on every engine of the cluster.

An engine rank has no IPython Application, and ipykernel's ``enable_gui`` looked the kernel up
through one: ``%matplotlib inline`` failed there with "You didn't specify a kernel" (the shell
now hands it the engine's kernel, python/pxfabric/shell.py).
"""

from __future__ import annotations

import base64
import re

import pytest

pytest.importorskip("matplotlib")

ENGINES = 4

pytestmark = pytest.mark.timeout(180)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _pngs(outputs):
    """The decoded image/png payloads among one engine's display outputs."""
    return [base64.b64decode(o["data"]["image/png"]) for o in outputs if "image/png" in o.get("data", {})]


def _figures_per_engine(ar, n_expected=1):
    ar.get(timeout=60)
    assert ar.wait_for_output(30)
    per_engine = dict(zip(ar.engine_id, ar.outputs))
    for eid, outputs in per_engine.items():
        pngs = _pngs(outputs)
        assert len(pngs) == n_expected, (eid, outputs)
        assert all(p.startswith(PNG_MAGIC) for p in pngs), eid
    return per_engine


@pytest.fixture
def dv(rc):
    view = rc[:]
    view.block = False
    return view


def test_matplotlib_inline_figure_from_every_engine(dv, rc):
    dv.execute("%matplotlib inline").get(timeout=60)
    ar = dv.execute("import matplotlib.pyplot as plt\n"
                    "fig, ax = plt.subplots()\n"
                    "ax.plot(range(10))\n", silent=False)
    per_engine = _figures_per_engine(ar)
    assert sorted(per_engine) == sorted(rc.ids)
    for outputs in per_engine.values():
        (fig,) = [o for o in outputs if "image/png" in o["data"]]
        assert "text/plain" in fig["data"]  # '<Figure size ... with 1 Axes>', as on stock
    # A silent execute (view.execute's default) shows the figure too.
    _figures_per_engine(dv.execute("plt.figure(); plt.plot([3, 1, 2])"))


def test_display_figure(dv):
    dv.execute("%matplotlib inline").get(timeout=60)
    ar = dv.execute("import matplotlib.pyplot as plt\n"
                    "from IPython.display import display\n"
                    "fig = plt.figure()\n"
                    "plt.plot([1, 2, 3])\n"
                    "display(fig)\n"
                    "plt.close(fig)\n")
    _figures_per_engine(ar)


def test_magic_pylab(rc):
    # ipyparallel's own tests/test_view.py::test_magic_pylab (timeouts for a busy machine).
    view = rc[-1]
    view.execute("%pylab inline").get(timeout=60)
    ar = view.execute("plot(rand(100))", silent=False)
    reply = ar.get(timeout=60)
    assert ar.wait_for_output(30)
    assert len(reply.outputs) == 1
    assert "image/png" in reply.outputs[0]["data"]


def test_px_pylab(rc, tmp_path, capsys):
    # ipyparallel's own tests/test_magics.py::test_px_pylab, through a real InteractiveShell.
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.core.profiledir import ProfileDir
    from traitlets.config import Config

    if InteractiveShell.initialized():
        InteractiveShell.clear_instance()
    config = Config()
    config.HistoryManager.enabled = False
    ip = InteractiveShell.instance(
        config=config, profile_dir=ProfileDir.create_profile_dir(str(tmp_path / "ipython")))
    try:
        v = rc[-1]
        v.block = True
        v.activate()
        capsys.readouterr()
        ip.run_line_magic("px", "%pylab inline")
        out = ANSI.sub("", capsys.readouterr().out)
        assert "Populating the interactive namespace from numpy and matplotlib" in out
        ip.run_line_magic("px", "plot(rand(100))")
        out = ANSI.sub("", capsys.readouterr().out)
        assert "Out[" in out
        assert "matplotlib.lines" in out
    finally:
        InteractiveShell.clear_instance()


def test_matplotlib_agg_savefig(dv, rc, tmp_path):
    ar = dv.execute("%matplotlib agg\n"
                    "import os\n"
                    "import matplotlib.pyplot as plt\n"
                    "fig = plt.figure()\n"
                    "plt.plot([1, 2, 3])\n"
                    f"plt.savefig(os.path.join({str(tmp_path)!r}, f'fig-{{os.getpid()}}.png'))\n"
                    "plt.close(fig)\n"
                    "backend = plt.get_backend()\n")
    ar.get(timeout=60)
    assert all("agg" in b.lower() for b in dv.pull("backend", block=True))
    files = sorted(tmp_path.glob("fig-*.png"))
    assert len(files) == len(rc.ids)
    assert all(f.read_bytes().startswith(PNG_MAGIC) for f in files)
    # agg shows nothing: no figure comes back.
    ar = dv.execute("plt.figure(); plt.plot([1, 2])", silent=False)
    ar.get(timeout=60)
    ar.wait_for_output(10)
    assert all(_pngs(outputs) == [] for outputs in ar.outputs)
