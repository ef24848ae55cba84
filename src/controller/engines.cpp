#include "controller/engines.hpp"

#include <algorithm>

namespace pxf::controller {

int EngineTable::allocate_id(int requested) {
  // A requested id is given whenever no live engine holds it, as stock's hub does
  // (new_engine_id): a restarted job gets its old ids back (pxcluster restart).
  if (requested >= 0 && !engines_.count(requested)) return requested;
  while (used_ids_.count(next_id_) || engines_.count(next_id_)) ++next_id_;
  return next_id_++;
}

Engine& EngineTable::add(int id, std::string uuid) {
  used_ids_.insert(id);
  by_uuid_[uuid] = id;
  Engine& e = engines_[id];
  ++pending_;
  e.id = id;
  e.uuid = std::move(uuid);
  e.serial = ++serials_;
  return e;
}

int EngineTable::max_used_id() const {
  int m = -1;
  for (int id : used_ids_) m = std::max(m, id);
  return m;
}

void EngineTable::mark_registered(Engine& e) {
  if (!e.registered) --pending_;
  e.registered = true;
  retired_completed_.erase(e.id);
  if (std::find(history_.begin(), history_.end(), e.id) == history_.end()) history_.push_back(e.id);
}

void EngineTable::remove(int id) {
  auto it = engines_.find(id);
  if (it == engines_.end()) return;
  if (!it->second.registered) --pending_;
  else retired_completed_[id] = std::move(it->second.completed);
  by_uuid_.erase(it->second.uuid);
  engines_.erase(it);
}

const IdLog* EngineTable::retired_completed(int id) const {
  auto it = retired_completed_.find(id);
  return it == retired_completed_.end() ? nullptr : &it->second;
}

Engine* EngineTable::by_id(int id) {
  auto it = engines_.find(id);
  return it == engines_.end() ? nullptr : &it->second;
}

Engine* EngineTable::by_uuid(std::string_view uuid) {
  auto it = by_uuid_.find(std::string(uuid));
  return it == by_uuid_.end() ? nullptr : by_id(it->second);
}

std::size_t EngineTable::registered_count() const {
  std::size_t n = 0;
  for (auto& [id, e] : engines_) n += e.registered;
  return n;
}

}  // namespace pxf::controller
