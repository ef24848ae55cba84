#pragma once
// Bounded memory of accepted signatures: a signature seen before is a replay.
// jupyter_client keeps 65,536 per session; so do we, oldest forgotten first.
#include <cstddef>
#include <deque>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_set>

namespace pxf::wire {

class ReplayGuard {
 public:
  explicit ReplayGuard(std::size_t capacity = 65536) : capacity_(capacity) {}
  // Not copyable: the age list points into the set's nodes. Moving keeps the nodes.
  ReplayGuard(const ReplayGuard&) = delete;
  ReplayGuard& operator=(const ReplayGuard&) = delete;
  ReplayGuard(ReplayGuard&&) = default;
  ReplayGuard& operator=(ReplayGuard&&) = default;

  // Records `signature`; returns false (and records nothing) if it was already there.
  bool accept(std::string_view signature);
  bool seen(std::string_view signature) const { return set_.find(signature) != set_.end(); }
  std::size_t size() const { return set_.size(); }
  std::size_t capacity() const { return capacity_; }

 private:
  // Transparent hash: seen() runs on every decode and looks up a string_view without allocating.
  struct Hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };
  std::size_t capacity_;
  std::unordered_set<std::string, Hash, std::equal_to<>> set_;
  // Age order as pointers into set_'s nodes (stable across rehash): each signature is stored once.
  std::deque<const std::string*> order_;
};

} // namespace pxf::wire
