#!/usr/bin/env bash
# Installs every Debian package pxfabric needs to build, run and test.
# Idempotent: does nothing when all are present; otherwise says what it installs.
# Needs no terminal (DEBIAN_FRONTEND=noninteractive); runs as root or through sudo.
set -euo pipefail

PACKAGES=(
  # build
  g++ cmake ninja-build pkg-config make
  # C++ dependencies
  openmpi-bin libopenmpi-dev libzmq3-dev cppzmq-dev nlohmann-json3-dev libssh-dev
  pybind11-dev python3-dev libssl-dev libgtest-dev
  # fuzzing (libFuzzer runtime for clang)
  clang libclang-rt-14-dev
  # Python side and tests (always /usr/bin/python3)
  python3 python3-mpi4py python3-ipyparallel python3-ipython python3-numpy python3-zmq
  python3-jupyter-client python3-psutil python3-pytest python3-pytest-timeout python3-pytest-xdist
  # process tools used by tests and pxcluster
  procps
  # multi-host tests: real sshd in network namespaces (iproute2, util-linux for unshare)
  openssh-server openssh-client iproute2 util-linux
  # Slurm tests: a real single-node or two-node Slurm started by the tests (config in a temp dir)
  slurm-wlm munge python3-matplotlib
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} Debian packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup: installing ${#missing[@]} missing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
echo "setup: done"
