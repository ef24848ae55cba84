// The load-balanced scheduler (scheduler.hpp).
#include "controller/scheduler.hpp"

#include "controller/errors.hpp"
#include "controller/job_link.hpp"
#include "controller/pyjson.hpp"
#include "link/protocol.hpp"
#include "util/clock.hpp"
#include "util/log.hpp"

#include <algorithm>
#include <cstdlib>

namespace pxf::controller {

using wire::view;

namespace {
constexpr const char* kLog = "scheduler";

json scheduler_error(const char* ename) { return error_content(ename, "", "ipyparallel.error"); }

// The request's whole header, the parent of a reply the scheduler builds itself (tasks are
// decoded with header_fields_only: msg_id/msg_type/session only, which is all dispatch needs).
json request_header(const Message& m) {
  auto v = view(m.header_frame);
  json h = json::parse(v.begin(), v.end(), nullptr, false);
  return h.is_object() ? h : m.header;
}

}  // namespace

TaskScheduler::TaskScheduler(EventLoop& loop, EngineTable& engines, TaskRecords& records, JobLink& link,
                             zmq::socket_t& task_in, const std::string& scheme, int hwm)
    : loop_(loop),
      counters_(loop.counters()),
      engines_(engines),
      records_(records),
      link_(link),
      task_in_(task_in),
      balancer_(scheme, hwm) {}

void TaskScheduler::on_task_submit(Frames&& frames, bool from_hub) {
  Message m;
  // What read_task_metadata reads; a plain submission has them all empty and needs no DOM.
  static constexpr std::array<std::string_view, 5> kTaskMetadata{"after", "follow", "targets", "timeout", "retries"};
  if (!loop_.decode("task_in", std::move(frames), m,
                    {.parse_parent = false,
                     .parse_metadata = true,
                     .parse_content = false,
                     .header_fields_only = true,
                     .metadata_skip_if_trivial = kTaskMetadata}))
    return;
  if (m.identities.empty()) return;
  Task t;
  t.msg_id = m.msg_id();
  t.key = task_key(t.msg_id);
  t.hub = from_hub;
  records_.add(t.msg_id, m, "task");
  outcomes_.seen(t.key);
  m.identities.resize(1);
  json md = std::move(m.metadata);
  t.msg = std::move(m);
  try {
    read_task_metadata(t, md);
  } catch (const DependencyError& e) {
    PXF_LOG(info, kLog) << "task " << t.msg_id << ": bad metadata: " << e.ename << ": " << e.what();
    fail_unreachable(std::move(t), error_content(e.ename, e.what(), ""));
    settle();
    return;
  }
  schedule(std::move(t));
  settle();
}

void TaskScheduler::read_task_metadata(Task& t, const json& md) {
  if (!md.is_object()) return;  // null: decode found every field empty (the defaults)
  if (auto it = md.find("targets"); it != md.end() && !it->is_null()) {
    if (!it->is_array())
      throw DependencyError("TypeError", std::string("'") + py_type(*it) + "' object is not iterable");
    for (auto& u : *it) {
      if (!u.is_string())
        throw DependencyError("TypeError", std::string("targets must be engine uuids (str), not ") + py_type(u));
      t.targeted = true;
      if (Engine* e = engines_.by_uuid(u.get_ref<const std::string&>()); e && e->registered)
        if (std::find(t.targets.begin(), t.targets.end(), e->id) == t.targets.end()) t.targets.push_back(e->id);
    }
  }
  if (auto it = md.find("retries"); it != md.end() && !it->is_null()) {
    if (it->is_boolean()) t.retries = it->get<bool>() ? 1 : 0;
    else if (it->is_number_integer())
      t.retries = static_cast<int>(std::clamp<std::int64_t>(it->get<std::int64_t>(), 0, 1 << 30));
    else throw DependencyError("TypeError", std::string("retries must be int, not ") + py_type(*it));
  }
  t.after = Dependency::parse(md.value("after", json()), true);
  t.follow = Dependency::parse(md.value("follow", json()), false);
  if (auto it = md.find("timeout"); it != md.end() && !it->is_null()) {
    // stock: `if timeout: timeout = float(timeout)`; a negative one fires as soon as it is armed.
    if (it->is_number() || it->is_boolean()) {
      t.timeout_s = it->get<double>();
    } else if (it->is_string()) {
      const std::string& s = it->get_ref<const std::string&>();
      char* end = nullptr;
      double v = s.empty() ? 0 : std::strtod(s.c_str(), &end);
      if (s.empty() || *end) throw DependencyError("ValueError", "could not convert string to float: '" + s + "'");
      t.timeout_s = v;
    } else {
      throw DependencyError("TypeError", std::string("float() argument must be a string or a real number, not '") +
                                             py_type(*it) + "'");
    }
  }
}

void TaskScheduler::schedule(Task&& t) {
  // Time dependencies already satisfied are pruned; a met `after` becomes empty.
  if (!t.after.empty()) {
    if (t.after.all) t.after.prune_met(outcomes_);
    if (t.after.met(outcomes_)) t.after = Dependency{};
  }
  for (const Dependency* dep : {&t.after, &t.follow}) {
    if (dep->empty()) continue;
    bool invalid = dep->contains(t.key) ||
                   std::any_of(dep->ids.begin(), dep->ids.end(), [&](TaskKey k) { return !outcomes_.known(k); });
    if (invalid) return fail_unreachable(std::move(t), scheduler_error("InvalidDependency"));
    if (dep->unreachable(outcomes_)) return fail_unreachable(std::move(t), scheduler_error("ImpossibleDependency"));
  }
  if (t.after.empty()) {
    if (maybe_run(t) != Run::wait) return;
  }
  park(std::move(t));
}

TaskScheduler::Run TaskScheduler::maybe_run(Task& t) {
  if (!balancer_.any_capacity()) return Run::wait;
  std::optional<int> choice;
  if (t.plain()) {
    choice = balancer_.choose({});
  } else {
    std::vector<int> ok;
    auto consider = [&](int id) {
      if (!balancer_.eligible(id)) return;
      if (failed_on(t, id)) return;
      if (!t.follow.met_on(outcomes_, id)) return;
      ok.push_back(id);
    };
    if (t.targeted)
      for (int id : t.targets) consider(id);
    else
      for (int id : balancer_.available()) consider(id);
    if (ok.empty()) {
      // Impossible: an `all` follow whose finished dependencies ran on different engines, or
      // no allowed engine left.
      if (t.follow.all && !t.follow.empty() && t.follow.destinations(outcomes_).size() > 1) {
        fail_unreachable(std::move(t), scheduler_error("ImpossibleDependency"));
        return Run::failed;
      }
      if (t.targeted) {
        std::erase_if(t.targets, [&](int id) { return failed_on(t, id); });
        if (std::none_of(t.targets.begin(), t.targets.end(), [&](int id) { return balancer_.has_engine(id); })) {
          fail_unreachable(std::move(t), scheduler_error("ImpossibleDependency"));
          return Run::failed;
        }
      }
      return Run::wait;
    }
    choice = balancer_.choose(ok);
  }
  if (!choice) return Run::wait;
  Engine* e = engines_.by_id(*choice);
  if (!e) return Run::wait;
  submit_to(std::move(t), *e);
  return Run::ran;
}

void TaskScheduler::submit_to(Task&& t, Engine& e) {
  balancer_.assigned(e.id);
  e.tasks.insert(t.msg_id);
  if (TaskRecord* r = records_.find(t.msg_id)) r->engine_uuid = e.uuid;
  Frames ids;
  ids.push_back(wire::frame(e.uuid));
  ids.push_back(wire::share(t.msg.identities.front()));
  // The task keeps its frames while in flight: an unmet @depend or a retry sends it again.
  link_.send_to_engine(link::kTaskChannel, e, wire::Session::forward_shared(t.msg, std::move(ids)));
  t.engine = e.id;
  TaskKey k = t.key;
  in_flight_.insert_or_assign(k, std::move(t));
}

void TaskScheduler::park(Task&& t) {
  t.seq = ++task_seq_;
  for (const Dependency* dep : {&t.after, &t.follow})
    for (TaskKey d : dep->ids)
      if (!outcomes_.done(d)) graph_[d].push_back(t.key);
  t.queue = 0;
  if (t.after.met(outcomes_) && t.follow.met(outcomes_)) {
    t.queue = t.plain() ? 1 : 2;
    (t.queue == 1 ? free_ : constrained_).emplace(t.seq, t.key);
  }
  if (t.timeout_s != 0) {
    ++t.timer;
    std::int64_t deadline = mono_ms() + static_cast<std::int64_t>(std::max(0.0, t.timeout_s) * 1000);
    timeouts_.emplace(deadline, t.key, t.timer);
  }
  TaskKey k = t.key;
  parked_.insert_or_assign(k, std::move(t));
}

TaskScheduler::Task TaskScheduler::unpark(std::unordered_map<TaskKey, Task>::iterator it) {
  Task t = std::move(it->second);
  parked_.erase(it);
  if (t.queue == 1) free_.erase(t.seq);
  if (t.queue == 2) constrained_.erase(t.seq);
  t.queue = 0;
  return t;
}

void TaskScheduler::fail_unreachable(Task&& t, const json& content) {
  ++counters_["task.failed_by_scheduler"];
  PXF_LOG(debug, kLog) << "task " << t.msg_id << " failed by the scheduler: " << content.value("ename", "");
  fail_task(std::move(t), -1, "", content, json::object());
}

// Answers `t` with a failure the scheduler builds (routed [C] or, from an engine, [C, E]),
// records it and lets its dependents see the outcome.
void TaskScheduler::fail_task(Task&& t, int engine_id, const std::string& engine_uuid, const json& content,
                              const json& metadata) {
  outcomes_.finish(t.key, false, engine_id);
  Frames ids;
  ids.push_back(std::move(t.msg.identities.front()));
  if (!engine_uuid.empty()) ids.push_back(wire::frame(engine_uuid));
  std::size_t h = ids.size() + 2;  // [ids..., DELIM, sig, header, parent, metadata, content]
  Frames out = loop_.session().build(std::move(ids), "apply_reply", content, request_header(t.msg), metadata);
  records_.complete(t.msg_id, std::string(view(out[h])), std::string(view(out[h + 2])), std::string(view(out[h + 3])),
                    engine_uuid);
  if (!t.hub) loop_.send(task_in_, std::move(out), "task_in");
  done_.push_back(t.key);
}

void TaskScheduler::on_task_reply(Frames&& frames) {
  Message m;
  // Only what the scheduler and the record read: status, dependencies_met, engine.
  static constexpr std::array<std::string_view, 3> kReplyMetadata{"status", "dependencies_met", "engine"};
  if (!loop_.decode("task_out", std::move(frames), m,
                    {.parse_parent = true,
                     .parse_metadata = true,
                     .parse_content = false,
                     .header_fields_only = true,
                     .metadata_fields = kReplyMetadata}))
    return;
  if (m.identities.size() < 2) return;
  auto it = in_flight_.find(task_key(m.parent_msg_id()));
  Engine* sender = engines_.by_uuid(view(m.identities[0]));
  if (it == in_flight_.end() || !sender || it->second.engine != sender->id) {
    // Not a task we wait for from that engine (e.g. it was already answered for a dead
    // engine): the stock scheduler drops these too.
    ++counters_["task.unexpected_reply"];
    return;
  }
  Task t = std::move(it->second);
  in_flight_.erase(it);
  balancer_.finished(sender->id);
  sender->tasks.erase(t.msg_id);
  bool deps_met = wire::get_or<bool>(m.metadata, "dependencies_met", true);
  std::string status = wire::get_or<std::string>(m.metadata, "status", "");
  bool success = status == "ok";
  if (!deps_met) {
    retry_elsewhere(std::move(t), sender->serial);
  } else if (!success && t.retries > 0) {
    --t.retries;
    retry_elsewhere(std::move(t), sender->serial);
  } else {
    if (status != "aborted") sender->completed.push_back(t.msg_id);
    task_done(std::move(t), std::move(m), success);
  }
  settle();
}

bool TaskScheduler::failed_on(const Task& t, int id) {
  const Engine* e = engines_.by_id(id);
  return e && std::find(t.blacklist.begin(), t.blacklist.end(), e->serial) != t.blacklist.end();
}

void TaskScheduler::retry_elsewhere(Task&& t, std::uint64_t engine_serial) {
  ++counters_["task.retried"];
  if (std::find(t.blacklist.begin(), t.blacklist.end(), engine_serial) == t.blacklist.end())
    t.blacklist.push_back(engine_serial);
  if (t.targeted && std::all_of(t.targets.begin(), t.targets.end(), [&](int id) { return failed_on(t, id); }))
    return fail_unreachable(std::move(t), scheduler_error("ImpossibleDependency"));
  if (maybe_run(t) == Run::wait) park(std::move(t));
}

void TaskScheduler::task_done(Task&& t, Message&& reply, bool success) {
  outcomes_.finish(t.key, success, t.engine);
  ++tasks_finished_;
  records_.complete(t.msg_id, reply);
  if (!t.hub) {
    std::swap(reply.identities[0], reply.identities[1]);
    loop_.send(task_in_, wire::Session::forward(std::move(reply)), "task_in");
  }
  done_.push_back(t.key);
}

void TaskScheduler::settle() {
  if (settling_) return;
  settling_ = true;
  do {
    while (!done_.empty()) {
      TaskKey k = done_.front();
      done_.pop_front();
      auto g = graph_.find(k);
      if (g == graph_.end()) continue;
      std::vector<TaskKey> dependents = std::move(g->second);
      graph_.erase(g);
      // Re-examined in queue order, as stock sorts them by submission time.
      std::vector<std::pair<std::uint64_t, TaskKey>> order;
      for (TaskKey d : dependents)
        if (auto p = parked_.find(d); p != parked_.end()) order.emplace_back(p->second.seq, d);
      std::sort(order.begin(), order.end());
      order.erase(std::unique(order.begin(), order.end()), order.end());
      for (auto& [seq, d] : order) {
        auto p = parked_.find(d);
        if (p == parked_.end()) continue;
        Task& t = p->second;
        if (t.after.unreachable(outcomes_) || t.follow.unreachable(outcomes_)) {
          fail_unreachable(unpark(p), scheduler_error("ImpossibleDependency"));
        } else if (t.queue == 0 && t.after.met(outcomes_) && t.follow.met(outcomes_)) {
          t.queue = t.plain() ? 1 : 2;
          (t.queue == 1 ? free_ : constrained_).emplace(t.seq, t.key);
        }
      }
    }
    dispatch_runnable();
  } while (!done_.empty());
  settling_ = false;
}

void TaskScheduler::dispatch_runnable() {
  // Runnable tasks in queue order while some engine has room. Plain tasks (free_) run on any
  // engine, so the first one always goes; constrained ones are tried in turn.
  auto cit = constrained_.begin();
  while (balancer_.any_capacity()) {
    bool take_free = !free_.empty() && (cit == constrained_.end() || free_.begin()->first < cit->first);
    if (!take_free && cit == constrained_.end()) break;
    TaskKey k = take_free ? free_.begin()->second : cit->second;
    auto p = parked_.find(k);
    if (p == parked_.end()) {  // cannot happen; keep the maps consistent anyway
      if (take_free) free_.erase(free_.begin());
      else cit = constrained_.erase(cit);
      continue;
    }
    Task& t = p->second;
    std::uint64_t seq = t.seq;
    if (take_free) free_.erase(free_.begin());
    else cit = constrained_.erase(cit);
    int queue = t.queue;
    t.queue = 0;
    Run r = maybe_run(t);
    if (r == Run::wait) {
      // Back in its place (only a constrained task can be refused while there is room).
      t.queue = queue;
      (queue == 1 ? free_ : constrained_).emplace(seq, k);
      if (take_free) break;
      continue;
    }
    parked_.erase(k);
  }
}

void TaskScheduler::on_timeouts(std::int64_t now) {
  bool fired = false;
  while (!timeouts_.empty() && std::get<0>(timeouts_.top()) <= now) {
    auto [deadline, k, gen] = timeouts_.top();
    timeouts_.pop();
    auto p = parked_.find(k);
    if (p == parked_.end() || p->second.timer != gen) continue;
    PXF_LOG(info, kLog) << "task " << p->second.msg_id << " timed out while waiting";
    fail_unreachable(unpark(p), scheduler_error("TaskTimeout"));
    fired = true;
  }
  if (fired) settle();
}

std::vector<std::string> TaskScheduler::waiting_ids() const {
  std::vector<std::pair<std::uint64_t, const std::string*>> u;
  for (auto& [k, t] : parked_) u.emplace_back(t.seq, &t.msg_id);
  std::sort(u.begin(), u.end());
  std::vector<std::string> ids;
  ids.reserve(u.size());
  for (auto& [seq, id] : u) ids.push_back(*id);
  return ids;
}

void TaskScheduler::strand_tasks(int engine_id, const std::string& uuid, std::uint64_t serial,
                                 const std::vector<std::string>& msg_ids) {
  for (auto& msg_id : msg_ids) {
    auto it = in_flight_.find(task_key(msg_id));
    if (it == in_flight_.end() || it->second.engine != engine_id) continue;
    Task t = std::move(it->second);
    in_flight_.erase(it);
    // As if the engine had answered with an error: retries apply.
    if (t.retries > 0) {
      --t.retries;
      retry_elsewhere(std::move(t), serial);
      continue;
    }
    ++counters_["task.engine_lost"];
    json content = error_content("EngineError", "Engine '" + uuid + "' died while running task '" + msg_id + "'");
    fail_task(std::move(t), engine_id, uuid, content, {{"status", "error"}, {"engine", uuid}, {"date", iso_now()}});
  }
}

}  // namespace pxf::controller
