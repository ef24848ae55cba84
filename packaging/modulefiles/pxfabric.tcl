#%Module1.0
## pxfabric modulefile for Environment Modules (Tcl; an example). Install pxfabric with
##   cmake --install build --prefix /opt/pxfabric/0.1.0
## copy this file to <a MODULEPATH directory>/pxfabric/0.1.0, set `root` below, then
##   module load pxfabric

set version 0.1.0
set root    /opt/pxfabric/$version

proc ModulesHelp { } {
    global version root
    puts stderr "pxfabric $version: an MPI-native engine fabric for the stock ipyparallel client."
    puts stderr ""
    puts stderr "  pxcluster start -n 64"
    puts stderr "  ipcluster start -n 64 --controller=pxfabric --engines=pxfabric"
    puts stderr "  sbatch --ntasks=64 $root/share/pxfabric/slurm/pxfabric.sbatch"
    puts stderr ""
    puts stderr "Documentation: $root/share/doc/pxfabric"
}

module-whatis "pxfabric $version: MPI engines and a ZeroMQ controller for the stock ipyparallel client"

# pxengine must run with the MPI it was built with; name the site's module here, e.g.
# prereq openmpi/4.1

prepend-path PATH              $root/bin
# the Python package and its ipyparallel entry points (ipcluster, ipp.Cluster, %load_ext)
prepend-path PYTHONPATH        $root/lib/pxfabric/python
# find_package(pxfabric) for C++ projects
prepend-path CMAKE_PREFIX_PATH $root
# where share/pxfabric/slurm/pxfabric.sbatch finds the programs
setenv       PXF_HOME          $root
