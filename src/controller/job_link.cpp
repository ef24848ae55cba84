// The controller's end of the fabric link (job_link.hpp, docs/fabric-link.md).
#include "controller/job_link.hpp"

#include "controller/broadcast_scheduler.hpp"
#include "controller/errors.hpp"
#include "controller/hub.hpp"
#include "controller/relays.hpp"
#include "controller/scheduler.hpp"
#include "link/protocol.hpp"
#include "util/clock.hpp"
#include "util/log.hpp"

#include <cstring>
#include <set>

namespace pxf::controller {

using wire::view;

namespace {
constexpr const char* kLog = "fabric";
constexpr std::string_view kHeartSuffix = link::kHeartSuffix;  // routing id of a job's heart thread
}  // namespace

JobLink::JobLink(EventLoop& loop, EngineTable& engines, const Options& opts, zmq::socket_t& fabric,
                 zmq::socket_t& fabric_monitor, zmq::socket_t& mux_out, zmq::socket_t& control_out,
                 zmq::socket_t& task_out)
    : loop_(loop),
      counters_(loop.counters()),
      engines_(engines),
      opts_(opts),
      fabric_(fabric),
      fabric_monitor_(fabric_monitor),
      mux_out_(mux_out),
      control_out_(control_out),
      task_out_(task_out) {}

void JobLink::attach(Hub& hub, TaskScheduler& tasks, BroadcastScheduler& broadcasts, Relays& relays) {
  hub_ = &hub;
  tasks_ = &tasks;
  broadcasts_ = &broadcasts;
  relays_ = &relays;
}

void JobLink::send_to_engine(const char* channel, const Engine& e, Frames&& frames) {
  if (e.job.empty()) {
    zmq::socket_t& s = channel[0] == 'm' ? mux_out_ : channel[0] == 'c' ? control_out_ : task_out_;
    loop_.send(s, std::move(frames), channel);
    return;
  }
  frames.insert(frames.begin(), wire::frame(channel));
  frames.insert(frames.begin(), wire::frame(e.job));
  ++counters_[std::string("fabric.") + channel + "_out"];
  loop_.send(fabric_, std::move(frames), "fabric");
}

void JobLink::send_link(const std::string& job, const char* type, const json& content, const json& parent) {
  Frames ids;
  ids.push_back(wire::frame(job));
  ids.push_back(wire::frame(link::kLinkChannel));
  loop_.send(fabric_, loop_.session().build(std::move(ids), type, content, parent), "fabric");
}

void JobLink::on_fabric(Frames&& frames) {
  if (frames.size() < 3) {
    ++counters_["drop.fabric.malformed"];
    return;
  }
  std::string job(view(frames[0]));
  std::string channel(view(frames[1]));
  if (job.ends_with(kHeartSuffix)) return on_job_heart(std::move(job), std::move(frames));
  auto jit = jobs_.find(job);
  if (jit != jobs_.end()) jit->second.last_heard_ms = mono_ms();
  if (channel == link::kLinkChannel) return on_link(job, std::move(frames));
  if (jit == jobs_.end()) {
    ++counters_["drop.fabric.unknown_job"];
    PXF_LOG(warning, kLog) << "message on '" << channel << "' from an unregistered job; dropped";
    return;
  }
  frames.erase(frames.begin(), frames.begin() + 2);
  ++counters_["fabric." + channel + "_in"];
  if (channel == link::kIopubChannel) return relays_->on_iopub(std::move(frames));
  if (channel == link::kBcastCoalescedChannel) return broadcasts_->on_coalesced_part(job, std::move(frames));
  // Replies name their engine first; a gateway speaks only for its own ranks.
  Engine* e = engines_.by_uuid(view(frames[0]));
  bool owned = e ? e->job == job : [&] {
    auto r = retired_.find(std::string(view(frames[0])));
    return r != retired_.end() && r->second == job;
  }();
  if (!owned) {
    ++counters_["drop.fabric.foreign_engine"];
    PXF_LOG(warning, kLog) << "job " << job << " sent a '" << channel << "' reply for an engine it does not own";
    return;
  }
  if (channel == link::kMuxChannel) return relays_->on_engine_direct(std::move(frames), false);
  if (channel == link::kControlChannel) return relays_->on_engine_direct(std::move(frames), true);
  if (channel == link::kTaskChannel) return tasks_->on_task_reply(std::move(frames));
  if (channel == link::kBcastChannel) return broadcasts_->on_broadcast_reply(std::move(frames));
  ++counters_["drop.fabric.unknown_channel"];
  PXF_LOG(warning, kLog) << "unknown channel '" << channel << "' from job " << job;
}

// A job's heartbeat, from its gateway's heart thread on a second connection ("<job>/hb").
void JobLink::on_job_heart(std::string rid, Frames&& frames) {
  std::string job = rid.substr(0, rid.size() - kHeartSuffix.size());
  auto jit = jobs_.find(job);
  if (jit == jobs_.end() || view(frames[1]) != link::kLinkChannel) {
    ++counters_["drop.fabric.unknown_job"];
    return;
  }
  frames.erase(frames.begin(), frames.begin() + 2);
  Message m;
  if (!loop_.decode("fabric.heart", std::move(frames), m, {.parse_parent = false, .parse_metadata = false})) return;
  if (m.msg_type() != link::kHeartbeat) {
    ++counters_["drop.fabric.unknown_type"];
    return;
  }
  jit->second.last_heard_ms = mono_ms();
  send_link(rid, link::kHeartbeatReply, {{"seq", m.content.value("seq", json(0))}}, m.header);
}

void JobLink::on_link(const std::string& job, Frames&& frames) {
  Message m;
  if (!loop_.decode("fabric.link", std::move(frames), m, {})) return;
  const std::string& type = m.msg_type();
  if (type == link::kRegisterRequest) return on_job_register(job, m);
  auto it = jobs_.find(job);
  if (it == jobs_.end()) {
    ++counters_["drop.fabric.unknown_job"];
    return;
  }
  if (type == link::kHeartbeat) {
    send_link(job, link::kHeartbeatReply, {{"seq", m.content.value("seq", json(0))}}, m.header);
  } else if (type == link::kUnregister) {
    std::string reason = wire::get_or<std::string>(m.content, "reason", "gateway request");
    for (auto& id : wire::get_or<json>(m.content, "ids", json::array())) {
      if (!id.is_number_integer()) continue;
      Engine* e = engines_.by_id(id.get<int>());
      if (e && e->job == job) hub_->unregister(e->id, "job " + job + ": " + reason);
    }
    auto& ids = it->second.engine_ids;
    std::erase_if(ids, [&](int id) { return engines_.by_id(id) == nullptr; });
    if (ids.empty()) jobs_.erase(job);
  } else {
    ++counters_["drop.fabric.unknown_type"];
    PXF_LOG(warning, kLog) << "unknown link message '" << type << "' from job " << job;
  }
}

void JobLink::on_job_register(const std::string& job, const Message& m) {
  auto fail = [&](const std::string& ename, const std::string& why) {
    PXF_LOG(warning, kLog) << "job " << job << " registration refused: " << why;
    send_link(job, link::kRegisterReply, error_content(ename, why, ""), m.header);
  };
  if (jobs_.count(job)) return fail("KeyError", "job '" + job + "' is already registered");
  auto list = m.content.find("engines");
  if (list == m.content.end() || !list->is_array() || list->empty())
    return fail("KeyError", std::string(link::kRegisterRequest) + " needs a non-empty 'engines' list");
  std::vector<std::pair<std::string, int>> ranks;  // (uuid, rank)
  for (auto& e : *list) {
    if (!e.is_object() || !e.contains("uuid") || !e["uuid"].is_string() || !e.contains("rank") ||
        !e["rank"].is_number_integer() || e["rank"].get<int>() < 0)
      return fail("TypeError", "each engine needs a string 'uuid' and a non-negative integer 'rank'");
    std::string uuid = e["uuid"].get<std::string>();
    if (uuid.empty() || engines_.uuid_known(uuid)) return fail("KeyError", "uuid '" + uuid + "' in use");
    ranks.emplace_back(std::move(uuid), e["rank"].get<int>());
  }
  // A job holding the ids asked for may be one whose ranks were killed before rank 0 could
  // unregister them (srun or mpirun ending a step with SIGKILL, then starting the same job
  // again): its gateway's connection is gone, and the ROUTER says so now rather than at the
  // next probe one ping period later.
  // Each holding job is probed once (a live one gets one pxf_probe, not one per rank).
  std::set<std::string> holders;  // copies: drop_job removes the engines
  for (auto& [uuid, rank] : ranks)
    if (const Engine* held = engines_.by_id(rank); held && !held->job.empty() && held->job != job)
      holders.insert(held->job);
  for (const auto& holder : holders)
    if (!probe_job(holder)) drop_job(holder, "its gateway's connection closed (seen at a registration)");
  // Engine id = rank when no live engine holds those ids (a job started again after the old
  // one unregistered gets the same ids: pxcluster restart); otherwise the job is offset past
  // every id ever used.
  int offset = 0;
  for (auto& [uuid, rank] : ranks)
    if (!engines_.id_free(rank)) offset = engines_.max_used_id() + 1;
  Job j;
  j.uuid = job;
  j.last_heard_ms = mono_ms();
  json ids = json::array();
  const json hosts = wire::get_or<json>(m.content, "hostnames", json::array());
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    auto& [uuid, rank] = ranks[i];
    int id = engines_.allocate_id(offset + rank);
    Engine& e = engines_.add(id, uuid);
    e.job = job;
    e.rank = rank;
    if (hosts.is_array() && i < hosts.size() && hosts[i].is_string()) e.host = hosts[i].get<std::string>();
    j.engine_ids.push_back(id);
    ids.push_back(id);
  }
  jobs_.emplace(job, j);
  send_link(job, link::kRegisterReply, {{"status", "ok"}, {"ids", ids}, {"hb_period", opts_.ping_ms}}, m.header);
  PXF_LOG(info, kLog) << "job " << job << " registered " << ranks.size() << " engines (ids from " << offset << ")";
  for (int id : j.engine_ids) hub_->finish_registration(*engines_.by_id(id));
}

void JobLink::drop_job(const std::string& job, const std::string& why) {
  auto it = jobs_.find(job);
  if (it == jobs_.end()) return;
  std::vector<int> ids = it->second.engine_ids;
  jobs_.erase(it);
  PXF_LOG(warning, kLog) << "job " << job << " lost: " << why;
  // Only the engines still of this job: an id unregistered by request may already belong to
  // the job started after it (ids are given again: pxcluster restart).
  for (int id : ids)
    if (Engine* e = engines_.by_id(id); e && e->job == job) hub_->unregister(id, "job lost: " + why);
}

void JobLink::retire(const std::string& uuid, const std::string& job) {
  if (retired_.size() > 65536) retired_.clear();
  retired_[uuid] = job;
}

std::vector<std::string> JobLink::silent_jobs(std::int64_t now, std::int64_t limit_ms) const {
  std::vector<std::string> silent;
  for (auto& [uuid, job] : jobs_)
    if (now - job.last_heard_ms > limit_ms) silent.push_back(uuid);
  return silent;
}

void JobLink::shutdown_jobs(const std::string& reason) {
  for (auto& [job, j] : jobs_) send_link(job, link::kShutdown, {{"reason", reason}}, json::object());
}

// ------------------------------------------------------------------ liveness

// A connection to the fabric ROUTER closed. Which job it was is not in the event, and a live
// gateway reconnects on its own (ZeroMQ retries every 100 ms): so after one ping period every
// job is probed, and a job the ROUTER cannot route to any more is lost.
void JobLink::on_monitor() {
  for (;;) {
    Frames ev;
    auto got = zmq::recv_multipart(fabric_monitor_, std::back_inserter(ev), zmq::recv_flags::dontwait);
    if (!got) break;
    if (ev.empty() || ev[0].size() < 6) continue;
    std::uint16_t event = 0;
    std::memcpy(&event, ev[0].data(), sizeof event);
    if (event != ZMQ_EVENT_DISCONNECTED) {
      loop_.count_handshake_failure("fabric", event);
      continue;
    }
    if (jobs_.empty()) continue;
    ++counters_["fabric.disconnects"];
    if (!probe_at_ms_) probe_at_ms_ = mono_ms() + std::max(250, opts_.ping_ms);
  }
}

void JobLink::on_timers(std::int64_t now) {
  if (probe_at_ms_ && now >= probe_at_ms_) {
    probe_at_ms_ = 0;
    probe_jobs();
  }
}

bool JobLink::probe_job(const std::string& uuid) {
  Frames ids;
  ids.push_back(wire::frame(uuid));
  ids.push_back(wire::frame(link::kLinkChannel));
  loop_.mark_sent(fabric_);
  try {
    zmq::send_multipart(fabric_, loop_.session().build(std::move(ids), link::kProbe, json::object(), json::object()));
  } catch (const zmq::error_t& e) {
    if (e.num() != EHOSTUNREACH) throw;
    return false;
  }
  return true;
}

void JobLink::probe_jobs() {
  std::vector<std::string> gone;
  for (auto& [uuid, job] : jobs_)
    if (!probe_job(uuid)) gone.push_back(uuid);
  for (auto& j : gone) drop_job(j, "its gateway's connection closed and did not come back");
}

}  // namespace pxf::controller
