#pragma once
// One multipart message as one contiguous MPI buffer:
//   u32 frame count | u64 size per frame | frame bytes, concatenated
#include "wire/frames.hpp"

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace pxf::mpi {

using Packet = std::vector<char>;

inline Packet pack_frames(const wire::Frames& frames) {
  std::size_t total = 4 + 8 * frames.size();
  for (const auto& f : frames) total += f.size();
  Packet p(total);
  char* o = p.data();
  auto n = static_cast<std::uint32_t>(frames.size());
  std::memcpy(o, &n, 4);
  o += 4;
  for (const auto& f : frames) {
    std::uint64_t s = f.size();
    std::memcpy(o, &s, 8);
    o += 8;
  }
  for (const auto& f : frames) {
    if (f.size()) std::memcpy(o, f.data(), f.size());
    o += f.size();
  }
  return p;
}

inline wire::Frames unpack_frames(const char* data, std::size_t size) {
  if (size < 4) throw std::runtime_error("fabric packet too short");
  std::uint32_t n;
  std::memcpy(&n, data, 4);
  if (4 + 8ull * n > size) throw std::runtime_error("fabric packet: bad frame count");
  const char* sizes = data + 4;
  const char* o = sizes + 8ull * n;
  const char* end = data + size;
  wire::Frames out;
  out.reserve(n);
  for (std::uint32_t i = 0; i < n; ++i) {
    std::uint64_t s;
    std::memcpy(&s, sizes + 8ull * i, 8);
    if (s > static_cast<std::uint64_t>(end - o)) throw std::runtime_error("fabric packet: bad frame size");
    out.emplace_back(o, s);
    o += s;
  }
  return out;
}

} // namespace pxf::mpi
