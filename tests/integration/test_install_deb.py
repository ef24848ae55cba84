"""The Debian package (issue 16): ``cpack -G DEB`` from the already-built tree, its control
data and contents (``dpkg-deb``), Depends against the shared libraries its programs need
(every NEEDED soname's Debian package, from ``dpkg -S``, must be in Depends), and a smoke test
of its files: unpacked (``dpkg-deb -x``) into a throwaway root, the .pth it puts into
/usr/lib/python3/dist-packages resolved as site.py does, then pxcluster start / the stock
client / stop from the unpacked /usr/bin with the checkout out of reach (installed.py).
A real ``apt-get install`` would need a chroot with Debian's packages; the Depends check
stands in for it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import installed  # noqa: E402
from installed import BUILD  # noqa: E402

pytestmark = pytest.mark.skipif(not (shutil.which("cpack") and shutil.which("dpkg-deb")),
                                reason="cpack or dpkg-deb missing (cmake, dpkg)")


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    """``cpack -G DEB`` into a temp directory (nothing is written into the build tree), and
    the package unpacked into ``root``."""
    problem = installed.build_problem()
    if problem:
        pytest.fail(problem, pytrace=False)
    if not (BUILD / "CPackConfig.cmake").is_file():
        pytest.fail(f"{BUILD}/CPackConfig.cmake missing: re-run cmake on the build tree", pytrace=False)
    out = tmp_path_factory.mktemp("deb")
    t0 = time.monotonic()
    r = subprocess.run(["cpack", "--config", str(BUILD / "CPackConfig.cmake"), "-G", "DEB",
                        "-B", str(out)], capture_output=True, text=True,
                       timeout=installed.CLI_TIMEOUT, cwd=str(out))
    assert r.returncode == 0, f"cpack failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    debs = list(out.glob("pxfabric_*.deb"))
    assert len(debs) == 1, f"expected one pxfabric_*.deb in {out}: {sorted(out.iterdir())}"
    root = out / "root"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True, timeout=60)
    print(f"cpack + unpack: {time.monotonic() - t0:.1f} s, {debs[0].stat().st_size >> 20} MiB")
    return SimpleNamespace(path=debs[0], root=root)


def _field(deb, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb.path), name], check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()


def _depends(deb) -> set:
    """Package names in Depends (versions and alternatives dropped)."""
    names = set()
    for clause in _field(deb, "Depends").split(","):
        for alt in clause.split("|"):
            names.add(re.sub(r"\s*\(.*\)", "", alt).strip())
    return names


@pytest.mark.timeout(240)        # includes cpack (module fixture)
def test_control_and_contents(deb):
    version = installed.project_version()
    assert deb.path.name.startswith(f"pxfabric_{version}_"), deb.path.name
    assert _field(deb, "Package") == "pxfabric"
    assert _field(deb, "Version") == version
    deps = _depends(deb)
    for need in ("openmpi-bin", "python3-ipyparallel", "python3-mpi4py", "python3-zmq",
                 "python3-psutil", "libzmq5"):
        assert need in deps, f"{need} not in Depends: {sorted(deps)}"
    listing = subprocess.run(["dpkg-deb", "-c", str(deb.path)], check=True, capture_output=True,
                             text=True, timeout=30).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for want in ("/usr/bin/pxcontroller", "/usr/bin/pxengine", "/usr/bin/pxcluster",
                 "/usr/lib/pxfabric/python/pxfabric/engine.py",
                 "/usr/lib/pxfabric/python/pxfabric.egg-info/entry_points.txt",
                 "/usr/lib/python3/dist-packages/pxfabric.pth",
                 "/usr/share/pxfabric/slurm/pxfabric.sbatch", "/usr/share/doc/pxfabric/README.md"):
        assert want in paths, f"{want} not in the package"
    assert all(p.startswith("/usr") or p == "/" for p in paths), \
        [p for p in paths if not p.startswith("/usr")]


def _soname_package(soname: str) -> str:
    """The Debian package that provides ``soname`` here (ldconfig's path, then dpkg -S on it
    and on its /usr-merged twin)."""
    cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    paths = [line.split("=>")[-1].strip() for line in cache.splitlines()
             if line.strip().startswith(soname + " ")]
    assert paths, f"{soname} is not in the dynamic linker's cache"
    candidates = []
    for p in paths:
        for q in (p, str(Path(p).resolve())):
            candidates += [q, q[4:] if q.startswith("/usr/") else "/usr" + q]
    for c in candidates:
        r = subprocess.run(["dpkg", "-S", c], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return r.stdout.split(":")[0].strip()
    raise AssertionError(f"no Debian package owns {soname} ({candidates})")


def test_depends_cover_needed_libraries(deb):
    if not shutil.which("dpkg") or not shutil.which("objdump"):
        pytest.skip("dpkg or objdump missing")
    deps = _depends(deb)
    missing = {}
    for exe in sorted((deb.root / "usr" / "bin").iterdir()):
        if not exe.read_bytes()[:4] == b"\x7fELF":
            continue
        dump = subprocess.run(["objdump", "-p", str(exe)], check=True, capture_output=True,
                              text=True, timeout=60).stdout
        for soname in re.findall(r"^\s*NEEDED\s+(\S+)", dump, re.M):
            pkg = _soname_package(soname)
            if pkg not in deps:
                missing.setdefault(pkg, []).append(f"{exe.name}: {soname}")
    assert not missing, f"Depends lacks the packages of needed libraries: {missing}"


def test_pth_and_entry_points(deb, tmp_path):
    """What /usr/lib/python3/dist-packages/pxfabric.pth does for /usr/bin/python3: pxfabric
    and its ipyparallel entry points importable without PYTHONPATH (site.addsitedir reads the
    .pth exactly as start-up does for the real site directory)."""
    site = deb.root / "usr/lib/python3/dist-packages"
    code = ("import site, sys, json\n"
            f"site.addsitedir({str(site)!r})\n"
            "import pxfabric\n"
            "from importlib.metadata import entry_points\n"
            "eps = entry_points(group='ipyparallel.engine_launchers')\n"
            "print(json.dumps([pxfabric.__file__, pxfabric.__version__,\n"
            "                  eps['pxfabric'].load().__name__]))\n")
    box = installed.Sandbox(deb.root / "usr", tmp_path, installed.can_hide())
    out = box.run(["/usr/bin/python3", "-c", code]).stdout.strip().splitlines()[-1]
    assert out == ('["%s", "%s", "PxMPIEngineSetLauncher"]'
                   % (deb.root / "usr/lib/pxfabric/python/pxfabric/__init__.py",
                      installed.project_version())), out


@pytest.mark.timeout(300)
def test_smoke_from_unpacked_package(deb, tmp_path):
    box = installed.Sandbox(deb.root / "usr", tmp_path, installed.can_hide())
    try:
        box.run(["pxcluster", "start", "-n", "2", "--timeout", "180"])
        ranks = box.client(2, box.ipythondir / "profile_default")
        assert [r[1] for r in ranks] == [3, 3], ranks
        assert {r[0] for r in ranks} == {
            str(deb.root / "usr/lib/pxfabric/python/pxfabric/__init__.py")}, ranks
        box.run(["pxcluster", "stop"])
        left = box.wait_gone()
        assert not left, f"left behind by pxcluster stop: {[p.pid for p in left]}"
    finally:
        leftovers = box.reap()
    assert not leftovers, leftovers
