#pragma once
#include <cstddef>

namespace pxf::wire {

// Bounds on what a decoder accepts. A message over any of them is dropped with a reason.
struct Limits {
  std::size_t max_frames = 100000;                     // all frames, identities and buffers included
  std::size_t max_frame_bytes = std::size_t{1} << 31;  // any single frame (buffers included)
  std::size_t max_json_bytes = std::size_t{64} << 20;  // each of header/parent/metadata/content
  std::size_t max_identities = 64;                     // routing frames before the delimiter
  // Nesting of [ and { in a JSON frame. nlohmann's dump/copy/compare recurse once per level, so an
  // unbounded depth lets a small frame overflow the stack on reencode; Python's json refuses
  // depth ~1000 anyway (RecursionError), so no stock peer can send or read anything deeper.
  std::size_t max_json_depth = 1000;
};

}  // namespace pxf::wire
