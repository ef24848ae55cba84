"""Where pxfabric's own files are: the programs, this Python package, the Slurm scripts.

Two layouts, told apart by where this package itself lives (nothing is baked in at build or
install time, so a copied or relocated tree keeps working):

* a **source tree** (a checkout): ``REPO/python/pxfabric`` -> programs in ``REPO/build/bin``
  (what ``scripts/build.sh`` makes), Slurm scripts in ``REPO/slurm``;
* an **installed prefix** (``cmake --install build --prefix P``, the Debian package with
  ``P=/usr``, Spack): ``P/lib/pxfabric/python/pxfabric`` -> programs in ``P/bin``, Slurm
  scripts in ``P/share/pxfabric/slurm``, docs in ``P/share/doc/pxfabric``.

``HOME`` is the checkout or the prefix: what ``slurm/pxfabric.sbatch`` calls ``PXF_HOME``
(it looks for ``$PXF_HOME/build/bin/NAME``, then ``$PXF_HOME/bin/NAME``).
The environment still wins where it always did (``$PXF_CONTROLLER``, ``$PXF_ENGINE``,
``$PXF_TUNNEL``); this module only answers the defaults.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PYTHON_DIR = PACKAGE_DIR.parent                  # what goes on sys.path / PYTHONPATH

# <prefix>/lib/pxfabric/python: the relative layout the installed pxengine and pxcluster also
# use (mpi/pyhost.cpp, packaging/pxcluster). A build tree's build/lib/pxfabric/python is a
# symbolic link to the checkout's python/ and resolves to the source layout above.
INSTALLED = (PYTHON_DIR.name == "python" and PYTHON_DIR.parent.name == "pxfabric"
             and PYTHON_DIR.parent.parent.name == "lib")

if INSTALLED:
    HOME = PYTHON_DIR.parents[2]
    BIN_DIR = HOME / "bin"
    SLURM_DIR = HOME / "share" / "pxfabric" / "slurm"
    DOC_DIR = HOME / "share" / "doc" / "pxfabric"
else:
    HOME = PYTHON_DIR.parent
    BIN_DIR = HOME / "build" / "bin"
    SLURM_DIR = HOME / "slurm"
    DOC_DIR = HOME


def program(name: str) -> Path:
    """The default path of one of pxfabric's programs (``pxcontroller``, ``pxengine``,
    ``pxtunnel``); whether it exists is the caller's question."""
    return BIN_DIR / name


def describe() -> str:
    """One line for messages: which layout, and where (a wrong one is the usual mistake)."""
    if INSTALLED:
        return f"the pxfabric installed in {HOME}"
    return f"the pxfabric checkout {HOME}, programs in {BIN_DIR}"
