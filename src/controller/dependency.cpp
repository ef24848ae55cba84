#include "controller/pyjson.hpp"
#include "controller/dependency.hpp"

#include <algorithm>
#include <functional>

namespace pxf::controller {

using nlohmann::json;

TaskKey task_key(std::string_view msg_id) { return std::hash<std::string_view>{}(msg_id); }

TaskOutcomes::Slot* TaskOutcomes::slot(TaskKey k, bool insert) {
  k = norm(k);
  if (slots_.empty()) {
    if (!insert) return nullptr;
    slots_.resize(1024);
  }
  std::size_t mask = slots_.size() - 1;
  // The key is already a hash; mix it once more so that clustered keys spread.
  std::size_t i = static_cast<std::size_t>((k ^ (k >> 29)) * 0x9E3779B97F4A7C15ULL) & mask;
  while (true) {
    Slot& s = slots_[i];
    if (s.key == k) return &s;
    if (s.key == 0) {
      if (!insert) return nullptr;
      if (2 * (size_ + 1) > slots_.size()) {  // keep the load under a half
        std::vector<Slot> old(slots_.size() * 2);
        old.swap(slots_);
        size_ = 0;
        for (auto& o : old)
          if (o.key) *slot(o.key, true) = o;
        return slot(k, true);
      }
      s.key = k;
      ++size_;
      return &s;
    }
    i = (i + 1) & mask;
  }
}

namespace {
// pred over every id (all) or some id (any).
template <class Pred>
bool holds(const std::vector<TaskKey>& ids, bool all, Pred pred) {
  return all ? std::all_of(ids.begin(), ids.end(), pred) : std::any_of(ids.begin(), ids.end(), pred);
}
}  // namespace

Dependency Dependency::parse(const json& j, bool falsy_is_empty) {
  Dependency d;
  if (j.is_null() || (falsy_is_empty && !truthy(j))) return d;
  const json* list = &j;
  json holder;
  if (j.is_object()) {
    // Dependency.__init__ reads a dict with .get() and these defaults.
    if (auto it = j.find("all"); it != j.end()) d.all = truthy(*it);
    if (auto it = j.find("success"); it != j.end()) d.success = truthy(*it);
    if (auto it = j.find("failure"); it != j.end()) d.failure = truthy(*it);
    auto it = j.find("dependencies");
    holder = it == j.end() ? json::array() : *it;
    list = &holder;
  }
  if (list->is_string()) {
    holder = json::array({*list});
    list = &holder;
  }
  if (!list->is_array())
    throw DependencyError("TypeError", std::string("'") + py_type(*list) + "' object is not iterable");
  for (auto& id : *list) {
    if (!id.is_string())
      throw DependencyError("TypeError", std::string("invalid dependency type: <class '") + py_type(id) + "'>");
    TaskKey k = task_key(id.get_ref<const std::string&>());
    if (!d.contains(k)) d.ids.push_back(k);
  }
  if (!d.success && !d.failure)
    throw DependencyError("ValueError", "Must depend on at least one of successes or failures!");
  return d;
}

bool Dependency::contains(TaskKey k) const { return std::find(ids.begin(), ids.end(), k) != ids.end(); }

bool Dependency::met(const TaskOutcomes& o) const {
  if (ids.empty()) return true;
  auto ok = [&](TaskKey k) {
    auto r = o.find(k);
    return r && counts(r->state);
  };
  return holds(ids, all, ok);
}

bool Dependency::met_on(const TaskOutcomes& o, int engine) const {
  if (ids.empty()) return true;
  auto ok = [&](TaskKey k) {
    auto r = o.find(k);
    return r && r->engine == engine && counts(r->state);
  };
  return holds(ids, all, ok);
}

bool Dependency::unreachable(const TaskOutcomes& o) const {
  if (ids.empty()) return false;
  auto bad = [&](TaskKey k) {
    auto r = o.find(k);
    return r && blocks(r->state);
  };
  return holds(ids, !all, bad);  // `all` fails with one blocked id, `any` only with all of them
}

void Dependency::prune_met(const TaskOutcomes& o) {
  std::erase_if(ids, [&](TaskKey k) {
    auto r = o.find(k);
    return r && counts(r->state);
  });
}

std::vector<int> Dependency::destinations(const TaskOutcomes& o) const {
  std::vector<int> out;
  for (TaskKey k : ids) {
    auto r = o.find(k);
    if (r && counts(r->state) && std::find(out.begin(), out.end(), r->engine) == out.end()) out.push_back(r->engine);
  }
  return out;
}

}  // namespace pxf::controller
