#pragma once
// Why a message was refused. Each reason is logged and counted; none escapes as an exception.
#include <array>
#include <atomic>
#include <cstdint>
#include <string>

namespace pxf::wire {

enum class Drop : std::uint8_t {
  none = 0,
  no_delimiter,      // no "<IDS|MSG>" frame
  too_few_frames,    // fewer than signature + 4 JSON frames after the delimiter
  too_many_frames,   // over Limits::max_frames or max_identities
  frame_too_large,   // a frame over Limits::max_frame_bytes / max_json_bytes
  unsigned_message,  // empty signature while a key is set
  bad_signature,     // HMAC mismatch
  replayed,          // signature already accepted once
  invalid_json,      // a JSON frame does not parse (includes invalid UTF-8)
  not_an_object,     // a JSON frame is valid JSON but not an object
  missing_field,     // header lacks msg_id / msg_type, or a field has the wrong type
  count_             // number of reasons (keep last)
};

const char* to_string(Drop d);

// Lock-free counters, one per reason; safe to bump from any thread.
class DropCounters {
 public:
  void bump(Drop d) { counts_[static_cast<std::size_t>(d)].fetch_add(1, std::memory_order_relaxed); }
  std::uint64_t get(Drop d) const { return counts_[static_cast<std::size_t>(d)].load(std::memory_order_relaxed); }
  std::uint64_t total() const;
  std::string summary() const;  // "bad_signature=3 replayed=1" (non-zero only)

 private:
  std::array<std::atomic<std::uint64_t>, static_cast<std::size_t>(Drop::count_)> counts_{};
};

}  // namespace pxf::wire
