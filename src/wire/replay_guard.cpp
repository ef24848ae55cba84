#include "wire/replay_guard.hpp"

namespace pxf::wire {

bool ReplayGuard::accept(std::string_view signature) {
  if (capacity_ == 0) return true;
  std::uint64_t fp = fingerprint(signature);
  if (!set_.insert(fp).second) return false;
  order_.push_back(fp);
  if (order_.size() > capacity_) {
    set_.erase(order_.front());
    order_.pop_front();
  }
  return true;
}

}  // namespace pxf::wire
