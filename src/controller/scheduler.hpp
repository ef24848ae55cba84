#pragma once
// The load-balanced task scheduler (protocol §3.4, §7), with the stock TaskScheduler's
// semantics: schemes and the HWM (load_balancer.hpp), targets, `after`/`follow` dependencies
// (dependency.hpp), timeouts while parked, retries with the failed engine left out, unmet
// @depend/@require, and tasks stranded on an engine that went away.
//
// Cost: a task that can run at once costs a few hash-map operations. A parked task is either
// blocked on a pending dependency (found again through graph_ when that one finishes) or
// runnable (free_ / constrained_, ordered by queue position); nothing scans all parked tasks.
#include "controller/dependency.hpp"
#include "controller/engines.hpp"
#include "controller/event_loop.hpp"
#include "controller/load_balancer.hpp"
#include "controller/records.hpp"

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <queue>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace pxf::controller {

class JobLink;

class TaskScheduler {
 public:
  // Tasks go to engines through `link` (a stock engine's task socket or its job's gateway);
  // replies and the scheduler's own failures go to clients on `task_in`.
  TaskScheduler(EventLoop& loop, EngineTable& engines, TaskRecords& records, JobLink& link, zmq::socket_t& task_in,
                const std::string& scheme, int hwm);

  // Client submits: [C, DELIM, ...]. The hub resubmits with a private identity (`from_hub`:
  // the reply goes to nobody).
  void on_task_submit(Frames&& frames, bool from_hub = false);
  // Engine replies: [E, C, DELIM, ...] arrives; [C, E, DELIM, ...] leaves.
  void on_task_reply(Frames&& frames);

  // A registered engine takes tasks from the next settle().
  void add_engine(int id) { balancer_.add_engine(id); }
  // An engine going away takes no more; its tasks are then strand_tasks'.
  void remove_engine(int id) { balancer_.remove_engine(id); }
  // Fails or reschedules the tasks an engine had when it went away (stock handle_stranded_tasks).
  // `serial` is the gone engine's Engine::serial.
  void strand_tasks(int engine_id, const std::string& uuid, std::uint64_t serial,
                    const std::vector<std::string>& msg_ids);
  // Re-examines what finished tasks unblock, then gives engines with room the first runnable tasks.
  void settle();

  // Load-balanced task timeouts apply only while a task waits for an engine (stock semantics).
  void on_timeouts(std::int64_t now);
  // The earliest timeout deadline, if any task waiting has one.
  std::optional<std::int64_t> next_timeout() const {
    if (timeouts_.empty()) return std::nullopt;
    return std::get<0>(timeouts_.top());
  }

  // For queue_request, pxf_stats_request and the heap-trim policy.
  std::size_t waiting_count() const { return parked_.size(); }
  std::vector<std::string> waiting_ids() const;  // in queue order
  std::size_t in_flight_count() const { return in_flight_.size(); }
  std::size_t outcomes_count() const { return outcomes_.size(); }
  std::size_t graph_count() const { return graph_.size(); }
  bool idle() const { return parked_.empty() && in_flight_.empty(); }
  std::uint64_t tasks_finished() const { return tasks_finished_; }

 private:
  struct Task {
    Message msg;  // identities = [client]; none for a hub resubmission
    std::string msg_id;
    TaskKey key = 0;
    std::vector<int> targets;  // allowed engine ids, when `targeted`
    bool targeted = false;
    // Engines it failed on (retries, unmet @depend/@require), by Engine::serial: stock keeps
    // uuids, so the new engine that takes a restarted job's id may run it.
    std::vector<std::uint64_t> blacklist;
    Dependency after, follow;
    double timeout_s = 0;  // armed each time the task is parked; 0 = none
    int retries = 0;
    std::uint64_t seq = 0;    // queue position: submission order, re-parked tasks last
    std::uint64_t timer = 0;  // generation of its current timeout
    int engine = -1;          // in flight: on which engine
    int queue = 0;            // parked: 0 blocked, 1 in free_, 2 in constrained_
    bool hub = false;         // resubmitted by the hub: the reply goes to nobody
    bool plain() const { return follow.empty() && !targeted && blacklist.empty(); }
  };
  enum class Run { ran, failed, wait };

  // Reads the request metadata into `t`; throws DependencyError for what it cannot read.
  void read_task_metadata(Task& t, const json& md);
  // Validates and queues or runs a new task (stock dispatch_submission after parsing).
  void schedule(Task&& t);
  // Runs `t` now if an engine may take it (stock maybe_run). ran: sent to an engine; failed:
  // answered with ImpossibleDependency; in both cases `t` has been moved from. wait: untouched.
  Run maybe_run(Task& t);
  void submit_to(Task&& t, Engine& e);
  // Parks a task until its dependencies are met and an engine can take it (stock save_unmet).
  void park(Task&& t);
  // Takes a parked task out of the queues.
  Task unpark(std::unordered_map<TaskKey, Task>::iterator it);
  // A reply that does not count (unmet @depend, or a failure with retries left): try elsewhere.
  void retry_elsewhere(Task&& t, std::uint64_t engine_serial);
  // Whether `t` failed on the engine that holds `id` now.
  bool failed_on(const Task& t, int id);
  // The end of a task: relay `reply` (or nothing for a hub resubmission), record, unblock.
  void task_done(Task&& t, Message&& reply, bool success);
  // Answers a task in the scheduler's name (InvalidDependency, ImpossibleDependency,
  // TaskTimeout, bad metadata): no engine frame, metadata {}; counts as failed for dependents.
  void fail_unreachable(Task&& t, const json& content);
  void fail_task(Task&& t, int engine_id, const std::string& engine_uuid, const json& content, const json& metadata);
  void dispatch_runnable();

  EventLoop& loop_;
  Counters& counters_;
  EngineTable& engines_;
  TaskRecords& records_;
  JobLink& link_;
  zmq::socket_t& task_in_;
  LoadBalancer balancer_;
  // A parked task is either blocked (a dependency is pending: it is found through graph_ when
  // that one finishes) or runnable (in free_ when any engine will do, else in constrained_),
  // so a finished task costs work only for its own dependents.
  TaskOutcomes outcomes_;
  std::unordered_map<TaskKey, Task> parked_;
  std::map<std::uint64_t, TaskKey> free_, constrained_;      // runnable, by seq
  std::unordered_map<TaskKey, std::vector<TaskKey>> graph_;  // dependency -> parked dependents
  std::deque<TaskKey> done_;                                 // finished, dependents not yet examined
  std::unordered_map<TaskKey, Task> in_flight_;
  using Timeout = std::tuple<std::int64_t, TaskKey, std::uint64_t>;  // deadline, task, generation
  std::priority_queue<Timeout, std::vector<Timeout>, std::greater<>> timeouts_;
  std::uint64_t task_seq_ = 0;
  std::uint64_t tasks_finished_ = 0;  // answered by an engine (the heap-trim policy reads it)
  bool settling_ = false;
};

}  // namespace pxf::controller
