// The controller side of the fabric link (docs/fabric-link.md): one ROUTER, one connection
// per MPI job, messages prefixed with a channel frame.
#include "controller/controller.hpp"
#include "controller/errors.hpp"
#include "util/clock.hpp"
#include "util/log.hpp"

namespace pxf::controller {

using wire::view;

namespace {
constexpr const char* kLog = "fabric";
}

void Controller::send_to_engine(const char* channel, const Engine& e, Frames&& frames) {
  if (e.job.empty()) {
    zmq::socket_t& s = channel[0] == 'm' ? mux_out_ : channel[0] == 'c' ? control_out_ : task_out_;
    send(s, std::move(frames), channel);
    return;
  }
  frames.insert(frames.begin(), wire::frame(channel));
  frames.insert(frames.begin(), wire::frame(e.job));
  ++counters_[std::string("fabric.") + channel + "_out"];
  send(fabric_, std::move(frames), "fabric");
}

void Controller::send_link(const std::string& job, const char* type, const json& content, const json& parent) {
  Frames ids;
  ids.push_back(wire::frame(job));
  ids.push_back(wire::frame("link"));
  send(fabric_, session_->build(std::move(ids), type, content, parent), "fabric");
}

// [G, channel, rest...] from a gateway.
void Controller::on_fabric(Frames&& frames) {
  if (frames.size() < 3) {
    ++counters_["drop.fabric.malformed"];
    return;
  }
  std::string job(view(frames[0]));
  std::string channel(view(frames[1]));
  if (job.ends_with(kHeartSuffix)) return on_job_heart(std::move(job), std::move(frames));
  auto jit = jobs_.find(job);
  if (jit != jobs_.end()) jit->second.last_heard_ms = mono_ms();
  if (channel == "link") return on_link(job, std::move(frames));
  if (jit == jobs_.end()) {
    ++counters_["drop.fabric.unknown_job"];
    PXF_LOG(warning, kLog) << "message on '" << channel << "' from an unregistered job; dropped";
    return;
  }
  frames.erase(frames.begin(), frames.begin() + 2);
  ++counters_["fabric." + channel + "_in"];
  if (channel == "iopub") return on_iopub(std::move(frames));
  if (channel == "bcast_coalesced") return on_coalesced_part(job, std::move(frames));
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
  if (channel == "mux") return on_engine_direct(std::move(frames), false);
  if (channel == "control") return on_engine_direct(std::move(frames), true);
  if (channel == "task") return on_task_reply(std::move(frames));
  if (channel == "bcast") return on_broadcast_reply(std::move(frames));
  ++counters_["drop.fabric.unknown_channel"];
  PXF_LOG(warning, kLog) << "unknown channel '" << channel << "' from job " << job;
}

// A job's heartbeat, from its gateway's heart thread on a second connection ("<job>/hb").
void Controller::on_job_heart(std::string rid, Frames&& frames) {
  std::string job = rid.substr(0, rid.size() - kHeartSuffix.size());
  auto jit = jobs_.find(job);
  if (jit == jobs_.end() || view(frames[1]) != "link") {
    ++counters_["drop.fabric.unknown_job"];
    return;
  }
  frames.erase(frames.begin(), frames.begin() + 2);
  Message m;
  if (!decode("fabric.heart", std::move(frames), m, {.parse_parent = false, .parse_metadata = false})) return;
  if (m.msg_type() != "pxf_heartbeat") {
    ++counters_["drop.fabric.unknown_type"];
    return;
  }
  jit->second.last_heard_ms = mono_ms();
  send_link(rid, "pxf_heartbeat_reply", {{"seq", m.content.value("seq", json(0))}}, m.header);
}

void Controller::on_link(const std::string& job, Frames&& frames) {
  Message m;
  if (!decode("fabric.link", std::move(frames), m, {})) return;
  const std::string& type = m.msg_type();
  if (type == "pxf_register_request") return on_job_register(job, m);
  auto it = jobs_.find(job);
  if (it == jobs_.end()) {
    ++counters_["drop.fabric.unknown_job"];
    return;
  }
  if (type == "pxf_heartbeat") {
    send_link(job, "pxf_heartbeat_reply", {{"seq", m.content.value("seq", json(0))}}, m.header);
  } else if (type == "pxf_unregister") {
    std::string reason = wire::get_or<std::string>(m.content, "reason", "gateway request");
    for (auto& id : wire::get_or<json>(m.content, "ids", json::array())) {
      if (!id.is_number_integer()) continue;
      Engine* e = engines_.by_id(id.get<int>());
      if (e && e->job == job) unregister(e->id, "job " + job + ": " + reason);
    }
    auto& ids = it->second.engine_ids;
    std::erase_if(ids, [&](int id) { return engines_.by_id(id) == nullptr; });
    if (ids.empty()) jobs_.erase(job);
  } else {
    ++counters_["drop.fabric.unknown_type"];
    PXF_LOG(warning, kLog) << "unknown link message '" << type << "' from job " << job;
  }
}

void Controller::on_job_register(const std::string& job, const Message& m) {
  auto fail = [&](const std::string& ename, const std::string& why) {
    PXF_LOG(warning, kLog) << "job " << job << " registration refused: " << why;
    send_link(job, "pxf_register_reply", error_content(ename, why, ""), m.header);
  };
  if (jobs_.count(job)) return fail("KeyError", "job '" + job + "' is already registered");
  auto list = m.content.find("engines");
  if (list == m.content.end() || !list->is_array() || list->empty())
    return fail("KeyError", "pxf_register_request needs a non-empty 'engines' list");
  std::vector<std::pair<std::string, int>> ranks;  // (uuid, rank)
  for (auto& e : *list) {
    if (!e.is_object() || !e.contains("uuid") || !e["uuid"].is_string() || !e.contains("rank") ||
        !e["rank"].is_number_integer() || e["rank"].get<int>() < 0)
      return fail("TypeError", "each engine needs a string 'uuid' and a non-negative integer 'rank'");
    std::string uuid = e["uuid"].get<std::string>();
    if (uuid.empty() || engines_.uuid_known(uuid)) return fail("KeyError", "uuid '" + uuid + "' in use");
    ranks.emplace_back(std::move(uuid), e["rank"].get<int>());
  }
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
  send_link(job, "pxf_register_reply", {{"status", "ok"}, {"ids", ids}, {"hb_period", opts_.ping_ms}}, m.header);
  PXF_LOG(info, kLog) << "job " << job << " registered " << ranks.size() << " engines (ids from " << offset << ")";
  for (int id : j.engine_ids) finish_registration(*engines_.by_id(id));
}

void Controller::drop_job(const std::string& job, const std::string& why) {
  auto it = jobs_.find(job);
  if (it == jobs_.end()) return;
  std::vector<int> ids = it->second.engine_ids;
  jobs_.erase(it);
  PXF_LOG(warning, kLog) << "job " << job << " lost: " << why;
  // Only the engines still of this job: an id unregistered by request may already belong to
  // the job started after it (ids are given again: pxcluster restart).
  for (int id : ids)
    if (Engine* e = engines_.by_id(id); e && e->job == job) unregister(id, "job lost: " + why);
}

} // namespace pxf::controller
