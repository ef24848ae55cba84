#pragma once
// Engine choice for load-balanced tasks (protocol §7.2-7.3): per-engine load, least recently
// used order for ties, the high-water mark, and the stock schemes. No sockets here.
#include <cstdint>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace pxf::controller {

class LoadBalancer {
 public:
  LoadBalancer(std::string scheme, int hwm);

  void add_engine(int id);  // new engines go first in LRU order, load 0
  void remove_engine(int id);
  bool has_engine(int id) const { return state_.count(id) != 0; }

  // Chooses among engines under the HWM (and in `allowed` when non-empty); nullopt if none.
  std::optional<int> choose(const std::vector<int>& allowed);
  // Engines under the HWM, in LRU order (least recently used first).
  std::vector<int> available() const { return candidates({}); }
  bool eligible(int id) const;  // registered and under the HWM
  int hwm() const { return hwm_; }
  void assigned(int id);  // load + 1, becomes most recently used
  void finished(int id);  // load - 1

  int load(int id) const;
  bool any_capacity() const;
  const std::string& scheme() const { return scheme_; }

 private:
  struct State {
    int load = 0;
    std::int64_t last_used = 0;
  };
  // Candidates in LRU order (least recently used first).
  std::vector<int> candidates(const std::vector<int>& allowed) const;

  std::string scheme_;
  int hwm_;
  std::unordered_map<int, State> state_;
  // Ordered by (load, last_used, id): begin() is leastload's choice in O(log n).
  std::set<std::tuple<int, std::int64_t, int>> by_load_;
  std::int64_t clock_ = 0;      // increasing "last used" stamps
  std::int64_t new_clock_ = 0;  // decreasing stamps put new engines first
  std::mt19937_64 rng_{std::random_device{}()};
};

}  // namespace pxf::controller
