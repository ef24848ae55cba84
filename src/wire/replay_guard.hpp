#pragma once
// Bounded memory of accepted signatures: a signature seen before is a replay.
// jupyter_client keeps 65,536 per session; so do we, oldest forgotten first.
// Kept as 64-bit fingerprints (no allocation per message): two different signatures share one
// with probability ~2^-48 over the whole window, which could only refuse a message, never
// accept a forged one (signatures are checked before this).
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <string_view>
#include <unordered_set>

namespace pxf::wire {

class ReplayGuard {
 public:
  explicit ReplayGuard(std::size_t capacity = 65536) : capacity_(capacity) {}
  // Records `signature`; returns false (and records nothing) if it was already there.
  bool accept(std::string_view signature);
  bool seen(std::string_view signature) const { return set_.count(fingerprint(signature)) != 0; }
  std::size_t size() const { return set_.size(); }
  std::size_t capacity() const { return capacity_; }

 private:
  static std::uint64_t fingerprint(std::string_view s) noexcept { return std::hash<std::string_view>{}(s); }
  // The fingerprints are hashes already: the set need not hash them again.
  struct Identity {
    std::size_t operator()(std::uint64_t v) const noexcept { return static_cast<std::size_t>(v); }
  };
  std::size_t capacity_;
  std::unordered_set<std::uint64_t, Identity> set_;
  std::deque<std::uint64_t> order_;  // age order
};

}  // namespace pxf::wire
