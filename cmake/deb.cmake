# The Debian package: `cpack -G DEB` in the build directory (or `cpack --config
# build/CPackConfig.cmake -G DEB -B OUTDIR`) -> pxfabric_<version>_<arch>.deb, installing under
# /usr. It holds the python-site component too: /usr/lib/python3/dist-packages/pxfabric.pth
# points /usr/bin/python3 at /usr/lib/pxfabric/python, so `import pxfabric` and the ipyparallel
# entry points work without PYTHONPATH. Depends: the Debian 12 packages that provide the shared
# libraries the programs need (tests/integration/test_install_deb.py checks every NEEDED soname
# against them with dpkg -S) and the Python packages pxcluster and the engines import.

# the interpreter pxengine embeds (and pxcluster runs on): Debian 12's python3 is 3.11
find_package(Python3 COMPONENTS Interpreter)
if(Python3_FOUND)
  set(_pxf_py "${Python3_VERSION_MAJOR}.${Python3_VERSION_MINOR}")
else()
  set(_pxf_py 3.11)
endif()
string(REGEX REPLACE "^([0-9]+)\\.([0-9]+)$" "\\2" _pxf_py_minor "${_pxf_py}")
math(EXPR _pxf_py_next "${_pxf_py_minor} + 1")
string(REGEX REPLACE "\\.[0-9]+$" ".${_pxf_py_next}" _pxf_py_next "${_pxf_py}")

set(_pxf_depends
  "libc6 (>= 2.34)" "libgcc-s1" "libstdc++6 (>= 12)" "libssl3 (>= 3.0.0)" "libzmq5 (>= 4.3)"
  "python3 (>= ${_pxf_py})" "python3 (<< ${_pxf_py_next})"
  "python3-ipyparallel (>= 7.1)" "python3-psutil" "python3-zmq" "python3-jupyter-client")
if(TARGET pxengine)
  list(APPEND _pxf_depends "libopenmpi3 (>= 4.1)" "openmpi-bin" "libpython${_pxf_py}" "python3-mpi4py")
endif()
if(TARGET pxtunnel)
  list(APPEND _pxf_depends "libssh-4 (>= 0.9)")
endif()
list(JOIN _pxf_depends ", " CPACK_DEBIAN_PACKAGE_DEPENDS)

set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME pxfabric)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_CONTACT "pxfabric developers <pxfabric@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "MPI-native engine fabric for the stock ipyparallel client")
# the extended description (CPack puts the summary above it and indents it)
set(CPACK_DEBIAN_PACKAGE_DESCRIPTION "pxcontroller (a drop-in for ipcontroller), pxengine (one MPI job of engines), \
pxtunnel and pxcluster; the ipyparallel launchers (ipcluster --controller=pxfabric \
--engines=pxfabric) and a Slurm batch script in /usr/share/pxfabric/slurm.")
set(CPACK_DEBIAN_PACKAGE_SECTION science)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)                # pxfabric_<version>_<arch>.deb
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)                              # no debug info: a few MiB, not 80
# everything `cmake --install` installs, plus the .pth (component python-site)
set(CPACK_INSTALL_CMAKE_PROJECTS
  "${PROJECT_BINARY_DIR};${PROJECT_NAME};ALL;/"
  "${PROJECT_BINARY_DIR};${PROJECT_NAME};python-site;/")
include(CPack)
