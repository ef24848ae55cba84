#include "wire/replay_guard.hpp"

namespace pxf::wire {

bool ReplayGuard::accept(std::string_view signature) {
  if (capacity_ == 0) return true;
  if (seen(signature)) return false;
  auto it = set_.emplace(signature).first;
  order_.push_back(&*it);
  if (order_.size() > capacity_) {
    set_.erase(set_.find(*order_.front()));  // by iterator: the key must not alias the erased node
    order_.pop_front();
  }
  return true;
}

} // namespace pxf::wire
