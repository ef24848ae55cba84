"""One version for the project, and pxfabric.paths' two layouts (no processes started).

The version lives in three places that cannot import each other: project(VERSION) in
CMakeLists.txt (compiled into pxcontroller/pxengine/pxtunnel --version and the .deb),
``pxfabric.__version__`` and the source tree's egg-info (the entry points' metadata). CMake
refuses to configure when they differ (cmake/install.cmake); this says so without a build.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pxfabric
from pxfabric import paths

REPO = Path(__file__).resolve().parents[2]


def test_one_version():
    cmake = re.search(r"project\(\s*pxfabric\s+VERSION\s+([0-9.]+)",
                      (REPO / "CMakeLists.txt").read_text()).group(1)
    egg = re.search(r"^Version: (\S+)$",
                    (REPO / "python/pxfabric.egg-info/PKG-INFO").read_text(), re.M).group(1)
    assert pxfabric.__version__ == cmake == egg, (pxfabric.__version__, cmake, egg)


def test_source_layout():
    assert not paths.INSTALLED
    assert paths.HOME == REPO
    assert paths.PYTHON_DIR == REPO / "python"
    assert paths.program("pxengine") == REPO / "build" / "bin" / "pxengine"
    assert paths.SLURM_DIR == REPO / "slurm"
    assert (paths.SLURM_DIR / "pxfabric.sbatch").is_file()


def test_installed_layout(tmp_path):
    """A package under <prefix>/lib/pxfabric/python answers for that prefix (checked by
    importing a copy of paths.py from there in a fresh interpreter)."""
    pkg = tmp_path / "prefix" / "lib" / "pxfabric" / "python" / "pxfabric"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "paths.py").write_text((REPO / "python/pxfabric/paths.py").read_text())
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pxfabric import paths as p; "
            "print(p.INSTALLED, p.HOME, p.program('pxengine'), p.SLURM_DIR, sep='\\n')")
    out = subprocess.run(["/usr/bin/python3", "-c", code, str(pkg.parent)], check=True,
                         capture_output=True, text=True, timeout=60).stdout.split("\n")
    prefix = tmp_path / "prefix"
    assert out[:4] == ["True", str(prefix), str(prefix / "bin" / "pxengine"),
                       str(prefix / "share" / "pxfabric" / "slurm")]
