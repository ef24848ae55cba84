# Spack recipe for pxfabric (an example for a site's own repository:
#   spack repo create myrepo && mkdir -p myrepo/packages/pxfabric
#   cp packaging/spack/package.py myrepo/packages/pxfabric/ && spack repo add myrepo
#   spack install pxfabric +python +tunnel ^openmpi
# then `spack load pxfabric` (or the module Spack generates) sets PATH and PYTHONPATH).
#
# The layout is the one `cmake --install` makes (cmake/install.cmake): programs in bin/, the
# Python package in lib/pxfabric/python (put on PYTHONPATH by setup_run_environment, so
# ipcluster and ipp.Cluster find the "pxfabric" launchers), Slurm scripts in
# share/pxfabric/slurm.

from spack.package import *


class Pxfabric(CMakePackage):
    """MPI-native SPMD engine fabric for the stock ipyparallel client: pxcontroller (a
    drop-in for ipcontroller), pxengine (one MPI job of engines), pxcluster, pxtunnel."""

    homepage = "https://example.org/pxfabric"
    git = "https://example.org/pxfabric.git"

    maintainers("pxfabric")
    license("BSD-3-Clause", checked_by="pxfabric")

    version("main", branch="main")
    version("0.1.0", tag="v0.1.0")

    variant("python", default=True,
            description="pxengine (the MPI engines, embedded CPython), pxcluster and the "
                        "ipyparallel launchers")
    variant("tunnel", default=True, description="pxtunnel (pxcluster connect; libssh)")

    depends_on("cxx", type="build")
    depends_on("cmake@3.25:", type="build")
    depends_on("pkgconfig", type="build", when="+tunnel")
    depends_on("ninja", type="build")
    generator("ninja")

    depends_on("libzmq@4.3:")
    depends_on("cppzmq")
    depends_on("nlohmann-json@3.10:")
    depends_on("openssl")
    depends_on("libssh@0.9:", when="+tunnel")

    with when("+python"):
        depends_on("mpi")
        depends_on("python@3.9:", type=("build", "link", "run"))
        depends_on("py-pybind11", type="build")
        depends_on("py-ipyparallel@7.1:", type="run")
        depends_on("py-mpi4py", type="run")
        depends_on("py-pyzmq", type="run")
        depends_on("py-psutil", type="run")

    def cmake_args(self):
        args = [
            self.define_from_variant("PXF_BUILD_ENGINE", "python"),
            self.define("PXF_BUILD_TESTS", self.run_tests),
        ]
        if self.spec.satisfies("+python"):
            args.append(self.define("Python3_EXECUTABLE", self.spec["python"].command.path))
        return args

    def setup_run_environment(self, env):
        if self.spec.satisfies("+python"):
            env.prepend_path("PYTHONPATH", join_path(self.prefix, "lib", "pxfabric", "python"))

    @run_after("install")
    def adapt_prefix(self):
        # pxcluster is written for Debian's /usr/bin/python3; here it runs Spack's python
        if self.spec.satisfies("+python"):
            filter_file(r"^#!/usr/bin/python3$", "#!" + self.spec["python"].command.path,
                        join_path(self.prefix.bin, "pxcluster"))
        # pxtunnel is built whenever libssh is found; ~tunnel keeps it out of the prefix
        if self.spec.satisfies("~tunnel"):
            force_remove(join_path(self.prefix.bin, "pxtunnel"))

    def test_versions(self):
        """every program answers --version with the package's version"""
        programs = ["pxcontroller"]
        if self.spec.satisfies("+python"):
            programs += ["pxengine", "pxcluster"]
        for name in programs:
            exe = which(join_path(self.prefix.bin, name))
            out = exe("--version", output=str, error=str)
            assert out.startswith(f"{name} "), out
            if not self.spec.satisfies("@main"):
                assert f" {self.spec.version}" in out, out
