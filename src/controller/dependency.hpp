#pragma once
// Task dependencies as ipyparallel's Dependency evaluates them (protocol §7.4), over a compact
// table of task outcomes. No sockets here: the scheduler (scheduler.cpp) and the unit tests use it.
//
// Tasks are known by a 64-bit hash of their msg_id (TaskKey): the outcome of every task the
// scheduler has seen costs a few bytes, not a string.
#include "controller/errors.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace pxf::controller {

using TaskKey = std::uint64_t;
TaskKey task_key(std::string_view msg_id);

enum class TaskState : std::uint8_t { pending, succeeded, failed };

// What the scheduler knows of every load-balanced task it has seen (stock: all_ids,
// all_completed, all_failed, destinations, and the per-engine completed/failed sets).
class TaskOutcomes {
 public:
  struct Outcome {
    std::int32_t engine = -1;  // where it ran; -1 if it never ran (failed by the scheduler)
    TaskState state = TaskState::pending;
  };
  void seen(TaskKey k) { slot(k, true); }
  void finish(TaskKey k, bool success, int engine) {
    Slot* s = slot(k, true);
    s->outcome = Outcome{engine, success ? TaskState::succeeded : TaskState::failed};
  }
  const Outcome* find(TaskKey k) const {
    const Slot* s = const_cast<TaskOutcomes*>(this)->slot(k, false);
    return s ? &s->outcome : nullptr;
  }
  bool known(TaskKey k) const { return find(k) != nullptr; }
  bool done(TaskKey k) const {
    auto o = find(k);
    return o && o->state != TaskState::pending;
  }
  std::size_t size() const { return size_; }

 private:
  // Open addressing in one array (16 bytes a task): it grows by doubling, in one block, instead
  // of one heap node per task.
  struct Slot {
    TaskKey key = 0;  // 0 = empty
    Outcome outcome;
  };
  static TaskKey norm(TaskKey k) { return k ? k : 1; }
  Slot* slot(TaskKey k, bool insert);
  std::vector<Slot> slots_;
  std::size_t size_ = 0;
};

// A dependency the scheduler cannot read; becomes an error reply with this ename.
using DependencyError = PyError;

struct Dependency {
  std::vector<TaskKey> ids;  // distinct
  bool all = true, success = true, failure = false;

  // From request metadata: a msg_id, a list of them, or {"dependencies", "all", "success",
  // "failure"}. `falsy_is_empty`: `after` is read only when truthy (stock `if after:`).
  // Throws DependencyError (TypeError / ValueError, as Dependency() raises them).
  static Dependency parse(const nlohmann::json& j, bool falsy_is_empty);

  bool empty() const { return ids.empty(); }
  bool contains(TaskKey k) const;
  // Met: all (or any) ids are in completed (if success) or failed (if failure).
  bool met(const TaskOutcomes& o) const;
  // The same, against the tasks that ran on `engine` (follow: a location dependency).
  bool met_on(const TaskOutcomes& o, int engine) const;
  // Can never be met any more.
  bool unreachable(const TaskOutcomes& o) const;
  // Drops ids that are already satisfied (stock does this for `after` with all=True).
  void prune_met(const TaskOutcomes& o);
  // Engines where the ids that count for this dependency ran (for the "follow on more than one
  // engine" impossibility check); -1 stands for tasks that never ran.
  std::vector<int> destinations(const TaskOutcomes& o) const;

 private:
  bool counts(TaskState s) const {
    return (success && s == TaskState::succeeded) || (failure && s == TaskState::failed);
  }
  bool blocks(TaskState s) const {
    return (!success && s == TaskState::succeeded) || (!failure && s == TaskState::failed);
  }
};

}  // namespace pxf::controller
