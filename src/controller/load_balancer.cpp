#include "controller/load_balancer.hpp"

#include <algorithm>

namespace pxf::controller {

LoadBalancer::LoadBalancer(std::string scheme, int hwm) : scheme_(std::move(scheme)), hwm_(hwm) {}

void LoadBalancer::add_engine(int id) {
  if (state_.count(id)) return;
  State s{0, --new_clock_};
  state_[id] = s;
  by_load_.emplace(s.load, s.last_used, id);
}

void LoadBalancer::remove_engine(int id) {
  auto it = state_.find(id);
  if (it == state_.end()) return;
  by_load_.erase({it->second.load, it->second.last_used, id});
  state_.erase(it);
}

bool LoadBalancer::eligible(int id) const {
  auto it = state_.find(id);
  return it != state_.end() && (hwm_ == 0 || it->second.load < hwm_);
}

bool LoadBalancer::any_capacity() const {
  if (by_load_.empty()) return false;
  return hwm_ == 0 || std::get<0>(*by_load_.begin()) < hwm_;
}

int LoadBalancer::load(int id) const {
  auto it = state_.find(id);
  return it == state_.end() ? 0 : it->second.load;
}

std::vector<int> LoadBalancer::candidates(const std::vector<int>& allowed) const {
  std::vector<std::pair<std::int64_t, int>> c;
  if (allowed.empty()) {
    for (auto& [id, s] : state_)
      if (eligible(id)) c.emplace_back(s.last_used, id);
  } else {
    for (int id : allowed)
      if (eligible(id)) c.emplace_back(state_.at(id).last_used, id);
  }
  std::sort(c.begin(), c.end());
  std::vector<int> out;
  out.reserve(c.size());
  for (auto& [t, id] : c) out.push_back(id);
  return out;
}

std::optional<int> LoadBalancer::choose(const std::vector<int>& allowed) {
  if (scheme_ == "leastload" && allowed.empty()) {
    // Hot path: the least loaded, least recently used engine, without scanning.
    if (!any_capacity()) return std::nullopt;
    return std::get<2>(*by_load_.begin());
  }
  auto c = candidates(allowed);
  if (c.empty()) return std::nullopt;
  if (scheme_ == "leastload") {
    return *std::min_element(c.begin(), c.end(), [&](int a, int b) { return load(a) < load(b); });
  }
  if (scheme_ == "lru") return c.front();
  if (scheme_ == "plainrandom") return c[std::uniform_int_distribution<std::size_t>(0, c.size() - 1)(rng_)];
  if (scheme_ == "twobin") {
    std::uniform_int_distribution<std::size_t> d(0, c.size() - 1);
    return c[std::min(d(rng_), d(rng_))];
  }
  // weighted: two draws weighted by 1/(1e-6 + load), keep the lighter one
  std::vector<double> w;
  for (int id : c) w.push_back(1.0 / (1e-6 + load(id)));
  std::discrete_distribution<std::size_t> d(w.begin(), w.end());
  std::size_t a = d(rng_), b = d(rng_);
  return c[w[a] >= w[b] ? a : b];
}

void LoadBalancer::assigned(int id) {
  auto it = state_.find(id);
  if (it == state_.end()) return;
  by_load_.erase({it->second.load, it->second.last_used, id});
  it->second.load += 1;
  it->second.last_used = ++clock_;
  by_load_.emplace(it->second.load, it->second.last_used, id);
}

void LoadBalancer::finished(int id) {
  auto it = state_.find(id);
  if (it == state_.end() || it->second.load == 0) return;
  by_load_.erase({it->second.load, it->second.last_used, id});
  it->second.load -= 1;
  by_load_.emplace(it->second.load, it->second.last_used, id);
}

}  // namespace pxf::controller
