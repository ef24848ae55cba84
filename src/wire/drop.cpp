#include "wire/drop.hpp"

namespace pxf::wire {

const char* to_string(Drop d) {
  switch (d) {
  case Drop::none: return "none";
  case Drop::no_delimiter: return "no_delimiter";
  case Drop::too_few_frames: return "too_few_frames";
  case Drop::too_many_frames: return "too_many_frames";
  case Drop::frame_too_large: return "frame_too_large";
  case Drop::unsigned_message: return "unsigned_message";
  case Drop::bad_signature: return "bad_signature";
  case Drop::replayed: return "replayed";
  case Drop::invalid_json: return "invalid_json";
  case Drop::not_an_object: return "not_an_object";
  case Drop::missing_field: return "missing_field";
  case Drop::count_: break;
  }
  return "unknown";
}

std::uint64_t DropCounters::total() const {
  std::uint64_t t = 0;
  for (auto& c : counts_) t += c.load(std::memory_order_relaxed);
  return t;
}

std::string DropCounters::summary() const {
  std::string out;
  for (std::size_t i = 1; i < counts_.size(); ++i) {
    auto n = counts_[i].load(std::memory_order_relaxed);
    if (!n) continue;
    if (!out.empty()) out += ' ';
    out += to_string(static_cast<Drop>(i));
    out += '=';
    out += std::to_string(n);
  }
  return out.empty() ? "none" : out;
}

}  // namespace pxf::wire
