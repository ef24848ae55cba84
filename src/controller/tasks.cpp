// The load-balanced scheduler (protocol §3.4, §7): least-load with the HWM, targets, LRU ties.
#include "controller/controller.hpp"
#include "controller/errors.hpp"
#include "util/clock.hpp"
#include "util/log.hpp"

namespace pxf::controller {

using wire::view;

namespace {
constexpr const char* kLog = "scheduler";

// True if a dependency (a list of msg_ids or {"dependencies": [...], ...}) names anything.
bool has_dependencies(const json& dep) {
  if (dep.is_array()) return !dep.empty();
  if (dep.is_object()) {
    auto it = dep.find("dependencies");
    return it != dep.end() && it->is_array() && !it->empty();
  }
  return false;
}
} // namespace

void Controller::fail_task(zmq::message_t client, const json& request_header, const json& content,
                           const std::string& engine_uuid) {
  ++counters_["task.failed_by_scheduler"];
  Frames ids;
  ids.push_back(std::move(client));
  json md = json::object();
  if (!engine_uuid.empty()) {
    ids.push_back(wire::frame(engine_uuid));
    md = {{"status", "error"}, {"engine", engine_uuid}, {"date", iso_now()}};
  }
  send(task_in_, session_->build(std::move(ids), "apply_reply", content, request_header, md), "task_in");
}

// Client submits: [C, DELIM, ...]
void Controller::on_task_submit(Frames&& frames) {
  Message m;
  if (!decode("task_in", std::move(frames), m, {.parse_parent = false, .parse_metadata = true, .parse_content = false})) return;
  if (m.identities.empty()) return;
  Task t;
  t.msg_id = m.msg_id();
  auto& md = m.metadata;
  std::string unsupported;
  if (has_dependencies(md.value("after", json())) || has_dependencies(md.value("follow", json())))
    unsupported = "task dependencies (after/follow)";
  else if (md.value("retries", json(0)).is_number_integer() && md.value("retries", 0) > 0)
    unsupported = "task retries";
  if (!unsupported.empty()) {
    zmq::message_t client = std::move(m.identities.front());
    PXF_LOG(info, kLog) << "task " << t.msg_id << " asks for " << unsupported << ": refused";
    fail_task(std::move(client), m.header,
              error_content("NotImplementedError", "pxcontroller does not support " + unsupported + " yet", ""), "");
    return;
  }
  if (auto it = md.find("targets"); it != md.end() && it->is_array() && !it->empty()) {
    t.targeted = true;
    for (auto& u : *it) {
      if (!u.is_string()) continue;
      if (Engine* e = engines_.by_uuid(u.get<std::string>()); e && e->registered) t.targets.push_back(e->id);
    }
    if (t.targets.empty()) {
      zmq::message_t client = std::move(m.identities.front());
      fail_task(std::move(client), m.header, error_content("ImpossibleDependency", "", "ipyparallel.error"), "");
      return;
    }
  }
  if (auto it = md.find("timeout"); it != md.end() && it->is_number() && it->get<double>() > 0)
    t.deadline_ms = mono_ms() + static_cast<std::int64_t>(it->get<double>() * 1000);
  records_.add(t.msg_id, m.header, m.metadata, "task");
  m.identities.resize(1);
  t.msg = std::move(m);
  if (waiting_.empty() && try_dispatch(t)) return;
  push_waiting(std::move(t));
}

bool Controller::try_dispatch(Task& t) {
  auto choice = balancer_.choose(t.targets);
  if (!choice) return false;
  Engine* e = engines_.by_id(*choice);
  if (!e) return false;
  balancer_.assigned(e->id);
  e->tasks.insert(t.msg_id);
  if (TaskRecord* r = records_.find(t.msg_id)) r->engine_uuid = e->uuid;
  InFlight f;
  f.engine = e->id;
  f.client = std::string(view(t.msg.identities.front()));
  Frames ids;
  ids.push_back(wire::frame(e->uuid));
  ids.push_back(std::move(t.msg.identities.front()));
  t.msg.identities = std::move(ids);
  f.header = std::move(t.msg.header);
  std::string msg_id = t.msg_id;
  send_to_engine("task", *e, wire::Session::forward(std::move(t.msg)));
  in_flight_.emplace(std::move(msg_id), std::move(f));
  return true;
}

void Controller::push_waiting(Task&& t) {
  if (t.deadline_ms) ++timed_waiting_;
  waiting_.push_back(std::move(t));
}

std::deque<Controller::Task>::iterator Controller::erase_waiting(std::deque<Task>::iterator it) {
  if (it->deadline_ms) --timed_waiting_;
  return waiting_.erase(it);
}

void Controller::dispatch_waiting() {
  for (auto it = waiting_.begin(); it != waiting_.end() && balancer_.any_capacity();) {
    // A task whose allowed engines have all gone can never run.
    std::erase_if(it->targets, [&](int id) { return !balancer_.has_engine(id); });
    if (it->targeted && it->targets.empty()) {
      zmq::message_t client = std::move(it->msg.identities.front());
      json header = std::move(it->msg.header);
      it = erase_waiting(it);
      fail_task(std::move(client), header, error_content("ImpossibleDependency", "", "ipyparallel.error"), "");
      continue;
    }
    if (try_dispatch(*it))
      it = erase_waiting(it);
    else
      ++it;
  }
}

// Engine replies: [E, C, DELIM, ...] arrives; [C, E, DELIM, ...] leaves.
void Controller::on_task_reply(Frames&& frames) {
  Message m;
  if (!decode("task_out", std::move(frames), m, {.parse_parent = true, .parse_metadata = false, .parse_content = false, .header_fields_only = true})) return;
  if (m.identities.size() < 2) return;
  std::string msg_id = m.parent_msg_id();
  auto it = in_flight_.find(msg_id);
  if (it != in_flight_.end()) {
    int id = it->second.engine;
    in_flight_.erase(it);
    balancer_.finished(id);
    if (Engine* e = engines_.by_id(id)) {
      e->tasks.erase(msg_id);
      e->completed.push_back(msg_id);
    }
    records_.complete(msg_id, m);
  } else {
    ++counters_["task.unexpected_reply"];
  }
  std::swap(m.identities[0], m.identities[1]);
  send(task_in_, wire::Session::forward(std::move(m)), "task_in");
  dispatch_waiting();
}

} // namespace pxf::controller
