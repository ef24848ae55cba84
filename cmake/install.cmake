# What `cmake --install build --prefix P` adds to the programs' own install rules: everything a
# user needs, laid out so that nothing refers to the build or source tree (a copied or moved
# prefix keeps working; the programs find each other relative to themselves:
# python/pxfabric/paths.py, mpi/pyhost.cpp, packaging/pxcluster):
#
#   P/bin/pxcontroller, pxengine, pxtunnel   (their own CMakeLists)
#   P/bin/pxcluster                          packaging/pxcluster (/usr/bin/python3)
#   P/lib/pxfabric/python/pxfabric/          the Python package every rank imports
#   P/lib/pxfabric/python/pxfabric.egg-info  its metadata: the ipyparallel launcher entry points
#   P/share/pxfabric/slurm/                  the batch script and template (PXF_HOME=P)
#   P/share/doc/pxfabric/                    README, docs, hostfile and modulefile examples
#
# The Python directory is fixed at lib/pxfabric/python (not CMAKE_INSTALL_LIBDIR, which is
# multiarch under /usr): the installed programs look for it there.
#
# Component python-site (not installed by default; the Debian package has it):
# P/${PXF_PYTHON_SITE_DIR}/pxfabric.pth, a relative link from the interpreter's site directory
# to lib/pxfabric/python, so `import pxfabric` and the entry points (ipcluster --engines=pxfabric,
# ipp.Cluster(engines="pxfabric")) work for /usr/bin/python3 without PYTHONPATH.

# One version for the project: project(VERSION) here, __version__ in the Python package, the
# Version of the source tree's egg-info. A mismatch stops the configuration.
file(STRINGS ${PROJECT_SOURCE_DIR}/python/pxfabric/__init__.py _pxf_line REGEX "^__version__ = ")
string(REGEX REPLACE "^__version__ = \"([^\"]*)\".*$" "\\1" _pxf_python_version "${_pxf_line}")
file(STRINGS ${PROJECT_SOURCE_DIR}/python/pxfabric.egg-info/PKG-INFO _pxf_line REGEX "^Version: ")
string(REGEX REPLACE "^Version: *" "" _pxf_egg_version "${_pxf_line}")
if(NOT _pxf_python_version STREQUAL PROJECT_VERSION OR NOT _pxf_egg_version STREQUAL PROJECT_VERSION)
  message(FATAL_ERROR "pxfabric has one version: project(pxfabric VERSION ${PROJECT_VERSION}) in "
    "CMakeLists.txt, but python/pxfabric/__init__.py says __version__ = \"${_pxf_python_version}\" "
    "and python/pxfabric.egg-info/PKG-INFO says Version: ${_pxf_egg_version}; make them the same")
endif()

set(PXF_PYTHON_INSTALL_DIR lib/pxfabric/python)
set(PXF_PYTHON_SITE_DIR lib/python3/dist-packages CACHE STRING
  "Site directory, relative to the prefix, for pxfabric.pth (component python-site; Debian's /usr layout)")

install(PROGRAMS ${PROJECT_SOURCE_DIR}/packaging/pxcluster DESTINATION ${CMAKE_INSTALL_BINDIR})

install(DIRECTORY ${PROJECT_SOURCE_DIR}/python/pxfabric DESTINATION ${PXF_PYTHON_INSTALL_DIR}
  FILES_MATCHING PATTERN "*.py" PATTERN "__pycache__" EXCLUDE)
file(CONFIGURE OUTPUT ${PROJECT_BINARY_DIR}/packaging/pxfabric.egg-info/PKG-INFO CONTENT
"Metadata-Version: 2.1
Name: pxfabric
Version: @PROJECT_VERSION@
Summary: MPI-native engine fabric for the stock ipyparallel client (installed with pxcontroller and pxengine)
" @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/packaging/pxfabric.egg-info/PKG-INFO
              ${PROJECT_SOURCE_DIR}/python/pxfabric.egg-info/entry_points.txt
  DESTINATION ${PXF_PYTHON_INSTALL_DIR}/pxfabric.egg-info)

install(PROGRAMS ${PROJECT_SOURCE_DIR}/slurm/pxfabric.sbatch
  DESTINATION ${CMAKE_INSTALL_DATADIR}/pxfabric/slurm)
install(FILES ${PROJECT_SOURCE_DIR}/slurm/pxcluster.sbatch.template ${PROJECT_SOURCE_DIR}/slurm/README.md
  DESTINATION ${CMAKE_INSTALL_DATADIR}/pxfabric/slurm)

install(FILES ${PROJECT_SOURCE_DIR}/README.md DESTINATION ${CMAKE_INSTALL_DOCDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/docs/ DESTINATION ${CMAKE_INSTALL_DOCDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/hostfiles DESTINATION ${CMAKE_INSTALL_DOCDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/packaging/modulefiles ${PROJECT_SOURCE_DIR}/packaging/spack
  DESTINATION ${CMAKE_INSTALL_DOCDIR}/examples PATTERN "__pycache__" EXCLUDE)

file(RELATIVE_PATH _pxf_pth_line /prefix/${PXF_PYTHON_SITE_DIR} /prefix/${PXF_PYTHON_INSTALL_DIR})
file(CONFIGURE OUTPUT ${PROJECT_BINARY_DIR}/packaging/pxfabric.pth CONTENT "${_pxf_pth_line}\n")
install(FILES ${PROJECT_BINARY_DIR}/packaging/pxfabric.pth DESTINATION ${PXF_PYTHON_SITE_DIR}
  COMPONENT python-site EXCLUDE_FROM_ALL)
