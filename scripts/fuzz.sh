#!/usr/bin/env bash
# Bounded fuzz run of the wire parser: builds the libFuzzer targets with clang++ (ASan + UBSan)
# in build-fuzz/ and runs fuzz_decode for SECONDS (default 30). Corpus, seeds and crash artifacts
# stay under build-fuzz/fuzz/ (never in the repo). Exits non-zero if the fuzzer finds a crash.
#   bash scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
dir=build-fuzz
work=$dir/fuzz

if [ ! -f $dir/CMakeCache.txt ]; then
  # -O1: the fuzzer wants quick rebuilds and sanitizer-friendly code more than peak speed.
  cmake -S . -B $dir -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=Debug \
    -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g" -DPXF_BUILD_FUZZ=ON -DPXF_BUILD_TESTS=OFF -DPXF_BUILD_ENGINE=OFF \
    -DPython3_EXECUTABLE=/usr/bin/python3 >/dev/null
fi
ninja -C $dir fuzz_decode

mkdir -p $work/corpus $work/seeds $work/artifacts
# Seeds and dictionary in fuzz_decode's input format: flags byte, then [u16 LE length][frame]...
/usr/bin/python3 - "$work" <<'PY'
import json, struct, sys
from pathlib import Path
work = Path(sys.argv[1])
def pack(flags, frames):
    return bytes([flags]) + b"".join(struct.pack("<H", len(f)) + f for f in frames)
def js(o, spaced=False):
    return json.dumps(o, ensure_ascii=False, separators=(", ", ": ") if spaced else (",", ":")).encode()
header = {"msg_id": "s_1_1", "msg_type": "apply_request", "session": "s", "username": "u",
          "date": "2026-11-21T15:50:56.826501Z", "version": "5.3"}
parent = dict(header, msg_id="s_1_0")
seeds = {
    "basic": pack(0b0111, [b"client", b"<IDS|MSG>", b"", js(header), b"{}", b"{}", b"{}"]),
    "full": pack(0b1111, [b"id-a", b"id-b", b"<IDS|MSG>", b"sig", js(header, True), js(parent, True),
                          js({"engine": "e", "targets": [0, 1], "timeout": None}),
                          js({"code": "print('h\u00e9llo \u2713 \U0001d11e')", "n": -1.5e-7, "ok": True}),
                          b"\x80\x04K*.", b""]),
    "no_idents": pack(0b0011, [b"<IDS|MSG>", b"", js(header), b"{}", b"{}", js({"a": [[{"b": {}}]]})]),
    "unparsed": pack(0b0101, [b"<IDS|MSG>", b"", js(header), b"{}", b"{}", b"not json"]),
    "escapes": pack(0b0111, [b"<IDS|MSG>", b"", js(header),
                             b'{"msg_id":"\\u00e9\\ud834\\udd1e\\n\\"\\\\"}', b"{}", b'{"t":"a\\u0000b"}']),
    "too_few": pack(0b0111, [b"<IDS|MSG>", b"", js(header), b"{}"]),
    "garbage": b"\x07\x05\x00<IDS|\xff\xfe",
}
for name, data in seeds.items():
    (work / "seeds" / name).write_bytes(data)
tokens = ["<IDS|MSG>", "msg_id", "msg_type", "session", "version", "5.3", "date", "{}", "[]", "{\"",
          "\":", "\\u", "\\ud834\\udd1e", "null", "true", "false", "1e308", "-0", "\xc3\xa9", "\xf0\x9d\x84\x9e"]
with open(work / "dict", "w", encoding="utf-8") as f:
    for t in tokens:
        f.write('"' + "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else
                              "".join("\\x%02x" % b for b in c.encode()) for c in t) + '"\n')
PY

# New inputs go to corpus/ (first dir); seeds/ is read only. A crash leaves crash-* in artifacts/.
set +e
$dir/bin/fuzz_decode -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
  -dict=$work/dict -artifact_prefix=$work/artifacts/ -print_final_stats=1 \
  $work/corpus $work/seeds >$work/last-run.log 2>&1
rc=$?
set -e
grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb)' $work/last-run.log || true
if [ $rc -ne 0 ]; then
  tail -n 60 $work/last-run.log
  echo "fuzz_decode found a problem (exit $rc); reproducer in $work/artifacts/, log in $work/last-run.log" >&2
  exit $rc
fi
echo "fuzz_decode: no crash in ${seconds}s (corpus $(ls $work/corpus | wc -l) inputs)"
