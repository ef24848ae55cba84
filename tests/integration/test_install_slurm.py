"""The installed batch script (issue 16): ``sbatch <prefix>/share/pxfabric/slurm/pxfabric.sbatch``
from a moved install prefix, with neither ``PXF_HOME`` nor ``PYTHONPATH`` set: the script finds
the prefix from the path it was submitted as (``share/pxfabric/slurm`` -> the prefix), runs the
prefix's pxcontroller and pxengine, and the ranks import the prefix's Python package. A private
real Slurm (the ``slurm`` fixture, slurm.py).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import psutil
import pytest

from test_pxcluster import mentioning  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import installed  # noqa: E402

START_TIMEOUT = 90


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    problem = installed.build_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    base = tmp_path_factory.mktemp("install-slurm")
    installed.install_prefix(base / "first")
    moved = base / "moved" / "pxfabric"
    shutil.copytree(base / "first", moved, symlinks=True)
    shutil.rmtree(base / "first")
    return moved


_ours = mentioning   # live processes whose command line names our private dir


@pytest.mark.timeout(300)
def test_sbatch_the_installed_script(slurm, prefix, tmp_path):
    profile = tmp_path / "profile_inst"
    env = {"IPP_PROFILE_DIR": str(profile), "PYTHONPATH": "",
           "PXF_HOME": "", "PYTHONDONTWRITEBYTECODE": "1"}
    script = prefix / "share" / "pxfabric" / "slurm" / "pxfabric.sbatch"
    r = slurm.run(["sbatch", "--parsable", "--ntasks=2", "--time=5", str(script)], env=env,
                  cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    out = tmp_path / f"slurm-{job}.out"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "stop with: scancel" not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline, out.read_text() if out.exists() else "no output"
            assert slurm.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
                out.read_text() if out.exists() else slurm.show_job(job)
            time.sleep(0.2)
        box = installed.Sandbox(prefix, tmp_path / "client", hide=False)
        ranks = box.client(2, profile, timeout=60)
        assert [r[1] for r in ranks] == [3, 3], ranks
        assert {r[0] for r in ranks} == {str(prefix / "lib/pxfabric/python/pxfabric/__init__.py")}
        exes = set()
        for p in _ours(str(profile)):
            try:
                exes.add(p.exe())
            except psutil.Error:
                pass
        assert str(prefix / "bin" / "pxcontroller") in exes, (exes, out.read_text())
        assert str(prefix / "bin" / "pxengine") in exes, (exes, out.read_text())
    finally:
        slurm.run(["scancel", job])
        slurm.wait_job_gone(job, timeout=30)
    deadline = time.monotonic() + 20
    while _ours(str(profile)):
        assert time.monotonic() < deadline, [p.pid for p in _ours(str(profile))]
        time.sleep(0.2)
