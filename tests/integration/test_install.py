"""``cmake --install`` (issue 16): the installed tree works by itself, moved, with the source
tree out of reach.

The already-built tree (``$PXF_BUILD_DIR`` or ``build/``) is installed into a temp prefix, the
prefix is copied elsewhere and the original deleted; every command then runs from the copy in
a clean environment (``PATH=<copy>/bin:/usr/bin:/bin``, no ``PYTHONPATH``, private ``HOME`` and
``IPYTHONDIR``, cwd outside the checkout) with the checkout and the build tree covered by an
empty tmpfs where the kernel allows it (``installed.py``). What a user types:

* ``pxcluster start -n 2`` / the stock client / ``pxcluster stop`` (PATH only);
* ``mpirun -n 2 pxengine`` without ``PYTHONPATH``: pxengine finds ``lib/pxfabric/python``
  next to itself (ranks that mpirun starts on other hosts get no PYTHONPATH either);
* ``ipcluster start --controller=pxfabric --engines=pxfabric`` with
  ``PYTHONPATH=<prefix>/lib/pxfabric/python`` -- what the modulefile (packaging/modulefiles) or
  ``spack load`` sets: /usr/bin/ipcluster is Debian's and finds the entry points on sys.path;
* ``find_package(pxfabric)`` from a consumer CMake project.
The Debian package: test_install_deb.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import installed  # noqa: E402
from installed import BUILD, REPO  # noqa: E402


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    """The installed prefix, moved: ``inst.prefix`` (the copy), ``inst.first`` (where it was
    installed, now gone), ``inst.hide`` (checkout and build tree out of reach)."""
    problem = installed.build_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    base = tmp_path_factory.mktemp("install")
    first = base / "first-prefix"
    t0 = time.monotonic()
    installed.install_prefix(first)
    prefix = base / "elsewhere" / "pxfabric"
    shutil.copytree(first, prefix, symlinks=True)
    shutil.rmtree(first)
    print(f"installed and moved in {time.monotonic() - t0:.1f} s")
    return SimpleNamespace(prefix=prefix, first=first, hide=installed.can_hide())


def _sandbox(inst, tmp_path, **env) -> installed.Sandbox:
    work = tmp_path / "work"
    work.mkdir()
    return installed.Sandbox(inst.prefix, work, inst.hide, extra_env=env)


def _programs(box: installed.Sandbox) -> set:
    """Names of the installed programs the sandbox's processes run (by executable path)."""
    names = set()
    for p in box.survivors():
        try:
            exe = Path(p.exe())
        except Exception:
            continue
        if exe.parent == box.prefix / "bin":
            names.add(exe.name)
    return names


@pytest.mark.timeout(240)        # includes the install (module fixture)
def test_layout(inst):
    p = inst.prefix
    for rel in ("bin/pxcontroller", "bin/pxengine", "bin/pxcluster",
                "share/pxfabric/slurm/pxfabric.sbatch"):
        assert os.access(p / rel, os.X_OK), f"{rel} missing or not executable"
    for rel in ("lib/pxfabric/python/pxfabric/engine.py", "lib/pxfabric/python/pxfabric/paths.py",
                "lib/pxfabric/python/pxfabric/launchers.py",
                "lib/pxfabric/python/pxfabric.egg-info/PKG-INFO",
                "share/pxfabric/slurm/pxcluster.sbatch.template", "share/pxfabric/slurm/README.md",
                "share/doc/pxfabric/README.md", "share/doc/pxfabric/hostfiles/two-nodes",
                "share/doc/pxfabric/examples/modulefiles/pxfabric.lua"):
        assert (p / rel).is_file(), f"{rel} missing"
    assert not list(p.rglob("__pycache__")), "byte code from the checkout was installed"
    assert list(p.glob("lib*/cmake/pxfabric/pxfabricConfig.cmake")), "CMake package missing"
    eps = (p / "lib/pxfabric/python/pxfabric.egg-info/entry_points.txt").read_text()
    assert "pxfabric = pxfabric.launchers:PxMPIEngineSetLauncher" in eps
    assert "pxfabric-slurm = pxfabric.launchers:PxSlurmEngineSetLauncher" in eps
    # the .pth is for the Debian package (component python-site), not a plain prefix
    assert not list(p.rglob("*.pth"))


def test_checkout_out_of_reach(inst, tmp_path):
    """The sandbox really covers the checkout and the build tree (else the other tests still
    run from the moved prefix with a clean environment, only with the checkout in reach)."""
    if not inst.hide:
        pytest.skip("no private mount namespace here (needs root and unshare): the install "
                    "tests ran with the checkout in reach")
    box = _sandbox(inst, tmp_path)
    for d in installed.HIDDEN:
        assert box.run(["/bin/ls", "-A", str(d)]).stdout.strip() == "", f"{d} still visible"


def test_versions(inst, tmp_path):
    """One version: CMake's project(VERSION), on every program and in the package metadata."""
    version = installed.project_version()
    box = _sandbox(inst, tmp_path)
    assert box.run(["pxcontroller", "--version"]).stdout.strip() == f"pxcontroller {version}"
    assert box.run(["pxengine", "--version"]).stdout.strip() == f"pxengine {version}"
    if (inst.prefix / "bin" / "pxtunnel").exists():
        assert box.run(["pxtunnel", "--version"]).stdout.startswith(f"pxtunnel {version} ")
    out = box.run(["pxcluster", "--version"]).stdout.strip()
    assert out == f"pxcluster {version} (the pxfabric installed in {inst.prefix})", out
    pkg_info = (inst.prefix / "lib/pxfabric/python/pxfabric.egg-info/PKG-INFO").read_text()
    assert f"\nVersion: {version}\n" in pkg_info


def _elf_rodata(path: Path, tmp: Path) -> bytes:
    out = tmp / (path.name + ".rodata")
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.rodata", str(path), str(out)],
                   check=True, capture_output=True, timeout=60)
    return out.read_bytes()


def test_no_build_or_source_paths(inst, tmp_path):
    """Nothing installed names the checkout, the build tree or the first prefix (for programs:
    their constant strings; debug info may name sources, as it does everywhere)."""
    needles = {str(REPO).encode(), str(BUILD).encode(), str(inst.first).encode()}
    bad = []
    for f in sorted(inst.prefix.rglob("*")):
        if f.is_symlink() or not f.is_file():
            continue
        data = f.read_bytes()
        if data.startswith(b"\x7fELF"):
            data = _elf_rodata(f, tmp_path)
        elif f.suffix == ".a":
            continue                  # archive members keep their object names only
        bad += [f"{f.relative_to(inst.prefix)}: {n.decode()}" for n in needles if n in data]
    assert not bad, "installed files refer to the build machine:\n" + "\n".join(bad)


@pytest.mark.timeout(300)
def test_pxcluster_from_moved_prefix(inst, tmp_path):
    """PATH is all it takes: pxcluster start, the stock client, MPI, pxcluster stop."""
    box = _sandbox(inst, tmp_path)
    try:
        box.run(["pxcluster", "start", "-n", "2", "--timeout", "180"])
        ranks = box.client(2, box.ipythondir / "profile_default")
        assert [r[1] for r in ranks] == [3, 3], ranks           # allreduce of 1 + 2
        for path, _ in ranks:
            assert path == str(inst.prefix / "lib/pxfabric/python/pxfabric/__init__.py"), ranks
        assert _programs(box) >= {"pxcontroller", "pxengine"}
        box.run(["pxcluster", "stop"])
        left = box.wait_gone()
        assert not left, f"left behind by pxcluster stop: {[p.pid for p in left]}"
    finally:
        leftovers = box.reap()
    assert not leftovers, leftovers


@pytest.mark.timeout(300)
def test_pxengine_finds_its_package_without_pythonpath(inst, tmp_path):
    """What a rank on another host sees: no PYTHONPATH, nothing but the program's own path."""
    box = _sandbox(inst, tmp_path, OMPI_MCA_btl="self,vader", OMPI_MCA_oob_tcp_if_include="lo")
    pdir = tmp_path / "profile"
    try:
        controller = _start_controller(box, pdir, tmp_path / "ctl.log")
        engines = box.popen(["mpirun", "-n", "2", "pxengine", f"--profile-dir={pdir}"],
                            tmp_path / "engines.log")
        try:
            ranks = box.client(2, pdir)
        except AssertionError:
            raise AssertionError((tmp_path / "engines.log").read_text()[-3000:])
        assert [r[1] for r in ranks] == [3, 3], ranks
        assert {r[0] for r in ranks} == {str(inst.prefix / "lib/pxfabric/python/pxfabric/__init__.py")}
        for proc in (engines, controller):
            proc.terminate()
            proc.wait(timeout=30)
        left = box.wait_gone()
        assert not left, f"left behind: {[p.pid for p in left]}"
    finally:
        leftovers = box.reap()
    assert not leftovers, leftovers


def _start_controller(box: installed.Sandbox, pdir: Path, log: Path):
    controller = box.popen(["pxcontroller", f"--profile-dir={pdir}"], log)
    engine_file = pdir / "security" / "ipcontroller-engine.json"
    deadline = time.monotonic() + 60
    while not engine_file.exists():
        assert controller.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "pxcontroller wrote no engine file in 60 s"
        time.sleep(0.1)
    return controller


@pytest.mark.timeout(120)
def test_pxengine_without_its_package_says_where_it_looked(inst, tmp_path):
    """A pxengine copied away from its lib/ (an incomplete install) fails at start-up and says
    where the package belongs."""
    box = _sandbox(inst, tmp_path, OMPI_MCA_btl="self,vader", OMPI_MCA_oob_tcp_if_include="lo")
    lone = tmp_path / "lone" / "bin"
    lone.mkdir(parents=True)
    shutil.copy2(inst.prefix / "bin" / "pxengine", lone / "pxengine")
    pdir = tmp_path / "profile"
    try:
        controller = _start_controller(box, pdir, tmp_path / "ctl.log")
        r = box.run(["mpirun", "-n", "1", str(lone / "pxengine"), f"--profile-dir={pdir}"],
                    check=False, timeout=120)
        assert r.returncode != 0
        out = r.stdout + r.stderr
        assert "No module named 'pxfabric'" in out, out[-3000:]
        assert f"looked in {tmp_path / 'lone' / 'lib' / 'pxfabric' / 'python'} " in out, out[-3000:]
        assert "pxfabric belongs in lib/pxfabric/python next to pxengine's bin/" in out, out[-3000:]
        controller.terminate()
        controller.wait(timeout=30)
    finally:
        leftovers = box.reap()
    assert not leftovers, leftovers


@pytest.mark.timeout(300)
def test_ipcluster_entry_points(inst, tmp_path):
    """``ipcluster start --controller=pxfabric --engines=pxfabric --daemonize`` with the
    modulefile's PYTHONPATH: the entry points resolve to the installed launchers, which run the
    installed pxcontroller and pxengine."""
    box = _sandbox(inst, tmp_path, PYTHONPATH=str(inst.prefix / "lib/pxfabric/python"))
    pdir = box.ipythondir / "profile_default"
    try:
        # --daemonize: the daemon keeps stdout/stderr, so they go to a file, not a pipe
        start = box.popen(["ipcluster", "start", "-n", "2", "--controller=pxfabric",
                           "--engines=pxfabric", "--daemonize"], tmp_path / "ipcluster.log")
        assert start.wait(timeout=installed.CLI_TIMEOUT) == 0, \
            (tmp_path / "ipcluster.log").read_text()[-3000:]
        ranks = box.client(2, pdir)
        assert [r[1] for r in ranks] == [3, 3], ranks
        assert {r[0] for r in ranks} == {str(inst.prefix / "lib/pxfabric/python/pxfabric/__init__.py")}
        assert _programs(box) >= {"pxcontroller", "pxengine"}
        box.run(["ipcluster", "stop"])
        left = box.wait_gone()
        assert not left, f"left behind by ipcluster stop: {[p.pid for p in left]}"
    finally:
        leftovers = box.reap()
    assert not leftovers, leftovers


CONSUMER_CMAKE = """cmake_minimum_required(VERSION 3.25)
project(consumer LANGUAGES CXX)
set(CMAKE_CXX_STANDARD 20)
find_package(pxfabric REQUIRED)
message(STATUS "pxfabric ${pxfabric_VERSION} from ${pxfabric_DIR}")
add_executable(consumer main.cpp)
target_link_libraries(consumer PRIVATE pxfabric::core)
"""
CONSUMER_MAIN = """#include "util/ids.hpp"
#include <cstdio>
int main() { std::printf("%s\\n", pxf::new_id().c_str()); }
"""


@pytest.mark.timeout(300)
def test_find_package_from_consumer(inst, tmp_path):
    box = _sandbox(inst, tmp_path)
    src = tmp_path / "consumer"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(CONSUMER_CMAKE)
    (src / "main.cpp").write_text(CONSUMER_MAIN)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    box.run(["cmake", "-S", str(src), "-B", str(src / "build"), *gen,
             f"-DCMAKE_PREFIX_PATH={inst.prefix}"])
    box.run(["cmake", "--build", str(src / "build")])
    out = box.run([str(src / "build" / "consumer")]).stdout.strip()
    assert len(out) == 33 and out[8] == "-", out
