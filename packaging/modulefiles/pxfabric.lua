-- pxfabric modulefile for Lmod (an example). Install pxfabric with
--   cmake --install build --prefix /opt/pxfabric/0.1.0
-- copy this file to <a MODULEPATH directory>/pxfabric/0.1.0.lua, set `root` below, then
--   module load pxfabric
help([[
pxfabric 0.1.0: an MPI-native engine fabric for the stock ipyparallel client.

  pxcluster start -n 64            controller + one MPI job of 64 engines (pxcluster --help)
  ipcluster start -n 64 --controller=pxfabric --engines=pxfabric
  sbatch --ntasks=64 $PXF_HOME/share/pxfabric/slurm/pxfabric.sbatch

Documentation: $PXF_HOME/share/doc/pxfabric
]])
whatis("Name: pxfabric")
whatis("Version: 0.1.0")
whatis("Category: parallel computing, Python")
whatis("Description: MPI engines and a ZeroMQ controller for the stock ipyparallel client")

local root = "/opt/pxfabric/0.1.0"

-- pxengine must run with the MPI it was built with; name the site's module here, e.g.
-- depends_on("openmpi/4.1")

prepend_path("PATH", pathJoin(root, "bin"))
-- the Python package and its ipyparallel entry points, for ipcluster, ipp.Cluster and
-- %load_ext pxfabric (pxcluster and pxengine find it without this)
prepend_path("PYTHONPATH", pathJoin(root, "lib/pxfabric/python"))
-- find_package(pxfabric) for C++ projects
prepend_path("CMAKE_PREFIX_PATH", root)
-- where share/pxfabric/slurm/pxfabric.sbatch finds the programs
setenv("PXF_HOME", root)
