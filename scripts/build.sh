#!/usr/bin/env bash
# Configures and builds pxfabric into build/ (binaries in build/bin/). Options are passed on
# every run so a stale cache cannot leave a part out.
set -euo pipefail
cd "$(dirname "$0")/.."
gen=()
if [ ! -f build/CMakeCache.txt ] && command -v ninja >/dev/null; then gen=(-G Ninja); fi
cmake -S . -B build "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython3_EXECUTABLE=/usr/bin/python3 \
  -DPXF_BUILD_ENGINE=ON -DPXF_BUILD_TESTS=ON >/dev/null
cmake --build build -j "$(nproc)"
