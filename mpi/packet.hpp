#pragma once
// One multipart message as one contiguous MPI buffer:
//   u32 frame count | u64 size per frame | frame bytes, concatenated
// A size with kBulkFlag set is a bulk frame: its bytes are not in the packet but follow it as
// their own contiguous MPI messages (fabric.cpp, tag kTagBulk), which MPI can move with a
// single copy (CMA) instead of the fragment pipeline a packed or derived-type send gets.
#include "wire/frames.hpp"

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

namespace pxf::mpi {

using Packet = std::vector<char>;

inline constexpr std::uint64_t kBulkFlag = std::uint64_t{1} << 63;

// Frames of `bulk_from` bytes or more become bulk frames (flagged, bytes left out).
inline Packet pack_frames(const wire::Frames& frames, std::size_t bulk_from = SIZE_MAX) {
  std::size_t total = 4 + 8 * frames.size();
  for (const auto& f : frames)
    if (f.size() < bulk_from) total += f.size();
  Packet p(total);
  char* o = p.data();
  auto n = static_cast<std::uint32_t>(frames.size());
  std::memcpy(o, &n, 4);
  o += 4;
  for (const auto& f : frames) {
    std::uint64_t s = f.size();
    if (f.size() >= bulk_from) s |= kBulkFlag;
    std::memcpy(o, &s, 8);
    o += 8;
  }
  for (const auto& f : frames) {
    if (f.size() >= bulk_from) continue;
    if (f.size()) std::memcpy(o, f.data(), f.size());
    o += f.size();
  }
  return p;
}

// Frames at least this large are not copied out of a received packet: they reference it.
inline constexpr std::size_t kShareFrameBytes = 64 * 1024;

namespace detail {
inline void release_packet(void* /*data*/, void* hint) { delete static_cast<std::shared_ptr<Packet>*>(hint); }
}  // namespace detail

// Like unpack_frames(data, size), but frames of kShareFrameBytes or more keep `packet` alive
// and point into it instead of copying (a 40 MB push to a rank was copied five times).
wire::Frames unpack_frames(const std::shared_ptr<Packet>& packet, std::vector<std::size_t>* bulk = nullptr);

// Bulk frames come out allocated but unfilled, their indices in `*bulk` (without `bulk`, a
// packet with bulk frames is refused).
inline wire::Frames unpack_frames(const char* data, std::size_t size, const std::shared_ptr<Packet>* owner = nullptr,
                                  std::vector<std::size_t>* bulk = nullptr) {
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
    if (s & kBulkFlag) {
      if (!bulk) throw std::runtime_error("fabric packet: unexpected bulk frame");
      bulk->push_back(out.size());
      out.emplace_back(static_cast<std::size_t>(s & ~kBulkFlag));
      continue;
    }
    if (s > static_cast<std::uint64_t>(end - o)) throw std::runtime_error("fabric packet: bad frame size");
    if (owner && s >= kShareFrameBytes) {
      out.emplace_back(const_cast<char*>(o), s, &detail::release_packet, new std::shared_ptr<Packet>(*owner));
    } else {
      out.emplace_back(o, s);
    }
    o += s;
  }
  return out;
}

inline wire::Frames unpack_frames(const std::shared_ptr<Packet>& packet, std::vector<std::size_t>* bulk) {
  return unpack_frames(packet->data(), packet->size(), &packet, bulk);
}

}  // namespace pxf::mpi
