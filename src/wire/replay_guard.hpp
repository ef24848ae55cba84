#pragma once
// Bounded memory of accepted signatures: a signature seen before is a replay.
// jupyter_client keeps 65,536 per session; so do we, oldest forgotten first.
#include <cstddef>
#include <deque>
#include <string>
#include <string_view>
#include <unordered_set>

namespace pxf::wire {

class ReplayGuard {
 public:
  explicit ReplayGuard(std::size_t capacity = 65536) : capacity_(capacity) {}

  // Records `signature`; returns false (and records nothing) if it was already there.
  bool accept(std::string_view signature);
  bool seen(std::string_view signature) const { return set_.count(std::string(signature)) != 0; }
  std::size_t size() const { return set_.size(); }
  std::size_t capacity() const { return capacity_; }

 private:
  std::size_t capacity_;
  std::unordered_set<std::string> set_;
  std::deque<std::string> order_;
};

} // namespace pxf::wire
