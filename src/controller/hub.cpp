// The hub: registration, queries and notifications on the registration socket (hub.hpp).
#include "controller/hub.hpp"

#include "controller/broadcast_scheduler.hpp"
#include "controller/db_query.hpp"
#include "controller/errors.hpp"
#include "controller/heart_monitor.hpp"
#include "controller/job_link.hpp"
#include "controller/scheduler.hpp"
#include "link/protocol.hpp"
#include "util/clock.hpp"
#include "util/log.hpp"
#include "util/memory.hpp"

#include <algorithm>

namespace pxf::controller {

using wire::view;

namespace {
constexpr const char* kLog = "hub";

// A request the hub cannot serve; becomes an error reply with this ename/evalue.
using BadRequest = PyError;

// Engine ids from a queue_request's `targets`: null = all, an int, an engine uuid, or a list.
// As stock's Hub._validate_targets, null means every id ever registered and may be none at all
// (queue_status on a controller without engines answers {'unassigned': n}); only an explicit
// empty list is "No Engines Registered".
std::vector<int> validate_targets(const json& targets, EngineTable& engines) {
  std::vector<int> out;
  if (targets.is_null()) {
    for (int id : engines.history()) out.push_back(id);
    return out;
  }
  json list = targets.is_array() ? targets : json::array({targets});
  std::vector<std::string> bad;
  for (auto& t : list) {
    if (t.is_number_integer()) {
      out.push_back(t.get<int>());
    } else if (t.is_string()) {
      Engine* e = engines.by_uuid(t.get<std::string>());
      if (!e) {
        bad.push_back(t.dump());
        continue;
      }
      out.push_back(e->id);
    } else {
      throw BadRequest("TypeError", "targets must be null, an engine id, a uuid or a list of them, not " + t.dump());
    }
  }
  auto& hist = engines.history();
  for (int id : out)
    if (std::find(hist.begin(), hist.end(), id) == hist.end()) bad.push_back(std::to_string(id));
  if (!bad.empty()) {
    std::string s = "No Such Engine: [";
    for (std::size_t i = 0; i < bad.size(); ++i) s += (i ? ", " : "") + bad[i];
    throw BadRequest("IndexError", s + "]");
  }
  if (out.empty()) throw BadRequest("IndexError", "No Engines Registered");
  return out;
}
// The stock hub answers a failed result/history/db/purge/resubmit request with its own reply
// type carrying error content, and everything else with hub_error.
const char* error_reply_type(const std::string& type) {
  if (type == "result_request") return "result_reply";
  if (type == "history_request") return "history_reply";
  if (type == "db_request") return "db_reply";
  if (type == "purge_request") return "purge_reply";
  if (type == "resubmit_request") return "resubmit_reply";
  return "hub_error";
}

// Python's repr of a list of strings: ['a', 'b']
std::string py_repr(const std::vector<std::string>& ids) {
  std::string s = "[";
  for (std::size_t i = 0; i < ids.size(); ++i) s += (i ? ", '" : "'") + ids[i] + "'";
  return s + "]";
}
}  // namespace

Hub::Hub(EventLoop& loop, EngineTable& engines, TaskRecords& records, TaskScheduler& tasks,
         BroadcastScheduler& broadcasts, JobLink& link, HeartMonitor& heart, const BufferCopier& copier,
         const Options& opts, const conn::EngineInfo& engine_info, zmq::socket_t& query, zmq::socket_t& notifier)
    : loop_(loop),
      counters_(loop.counters()),
      engines_(engines),
      records_(records),
      tasks_(tasks),
      broadcasts_(broadcasts),
      link_(link),
      heart_(heart),
      copier_(copier),
      opts_(opts),
      engine_info_(engine_info),
      query_(query),
      notifier_(notifier) {}

void Hub::reply(const zmq::message_t& ident, const Message& req, const char* type, const json& content,
                Frames buffers) {
  Frames ids;
  ids.push_back(wire::clone(ident));
  loop_.send(query_,
             loop_.session().build(std::move(ids), type, content, req.header, json::object(), std::move(buffers)),
             "query");
}

void Hub::notify(const char* type, const json& content, const json& parent) {
  loop_.send(notifier_, loop_.session().build({}, type, content, parent), "notification");
}

void Hub::forget_old_registrations(std::int64_t now) {
  while (!recent_.empty() && now - recent_.front().at_ms > kReplayWindowMs) recent_.pop_front();
}

void Hub::on_subscription(Frames&& frames) {
  // XPUB: one frame, 0x01 + topic for a subscription, 0x00 + topic when a subscriber leaves.
  if (frames.size() != 1 || frames.front().size() == 0 || *frames.front().data<std::uint8_t>() != 1) return;
  const std::int64_t now = mono_ms();
  if (!replay_due_ms_) replay_due_ms_ = std::max(now, last_replay_ms_ + kReplayIntervalMs);
  on_timers(now);
}

void Hub::on_timers(std::int64_t now) {
  if (!replay_due_ms_ || now < replay_due_ms_) return;
  replay_due_ms_ = 0;
  last_replay_ms_ = now;
  repeat_recent_registrations(now);
}

void Hub::repeat_recent_registrations(std::int64_t now) {
  forget_old_registrations(now);
  std::uint64_t repeated = 0;
  for (const auto& r : recent_) {
    const Engine* e = engines_.by_id(r.id);
    if (!e || !e->registered || e->serial != r.serial) continue;  // gone since, or another registration
    notify("registration_notification", {{"id", e->id}, {"uuid", e->uuid}});
    ++repeated;
  }
  if (repeated) counters_["notification.registrations_repeated"] += repeated;
}

void Hub::on_query(Frames&& frames) {
  if (frames.empty()) return;
  zmq::message_t ident = wire::clone(frames.front());
  Message m;
  wire::Decoded refused;
  if (!loop_.decode("query", std::move(frames), m, {}, &refused)) {
    auto why = refused.reason;
    // A signed but malformed request deserves an answer, as the stock hub gives; an
    // unauthenticated one does not.
    if (why == wire::Drop::invalid_json || why == wire::Drop::not_an_object || why == wire::Drop::missing_field) {
      Frames ids;
      ids.push_back(std::move(ident));
      loop_.send(query_,
                 loop_.session().build(std::move(ids), "hub_error", error_content("ValueError", refused.detail, "")),
                 "query");
    }
    return;
  }
  const std::string& type = m.msg_type();
  PXF_LOG(debug, kLog) << "client " << view(ident).size() << "B-id requested " << type;
  try {
    if (type == "connection_request") return on_connection_request(ident, m);
    if (type == "registration_request") return on_registration_request(ident, m);
    if (type == "unregistration_request") return on_unregistration_request(m);
    if (type == "queue_request") return on_queue_request(ident, m);
    if (type == "result_request") return on_result_request(ident, m);
    if (type == "history_request") return on_history_request(ident, m);
    if (type == "shutdown_request") return on_shutdown_request(ident, m);
    if (type == link::kStatsRequest) return on_stats_request(ident, m);
    if (type == link::kEnginesRequest) return on_engines_request(ident, m);
    if (type == "db_request") return on_db_request(ident, m);
    if (type == "purge_request") return on_purge_request(ident, m);
    if (type == "resubmit_request") return on_resubmit_request(ident, m);
    if (type == "become_dask_request" || type == "stop_distributed_request")
      throw BadRequest("NotImplementedError", "pxcontroller does not run a dask scheduler");
    throw BadRequest("KeyError", "Bad Message Type: '" + type + "'");
  } catch (const PyError& e) {  // BadRequest, and a db_request's QueryError
    ++counters_["query.error"];
    PXF_LOG(info, kLog) << type << ": " << e.ename << ": " << e.what();
    reply(ident, m, error_reply_type(type), error_content(e.ename, e.what(), ""));
  } catch (const json::exception& e) {
    ++counters_["query.error"];
    PXF_LOG(info, kLog) << type << ": malformed content: " << e.what();
    reply(ident, m, "hub_error", error_content("KeyError", std::string("malformed request: ") + e.what(), ""));
  }
}

void Hub::on_connection_request(const zmq::message_t& ident, const Message& m) {
  json engines = json::object();
  for (auto& [id, e] : engines_.all())
    if (e.registered) engines[std::to_string(id)] = e.uuid;
  reply(ident, m, "connection_reply", {{"status", "ok"}, {"engines", engines}});
}

void Hub::on_engines_request(const zmq::message_t& ident, const Message& m) {
  json engines = json::object();
  for (auto& [id, e] : engines_.all()) {
    if (!e.registered) continue;
    engines[std::to_string(id)] = {{"uuid", e.uuid},
                                   {"host", e.host},
                                   {"job", e.job.empty() ? json() : json(e.job)},
                                   {"rank", e.rank < 0 ? json() : json(e.rank)}};
  }
  reply(ident, m, link::kEnginesReply, {{"status", "ok"}, {"engines", engines}});
}

void Hub::on_registration_request(const zmq::message_t& ident, const Message& m) {
  auto it = m.content.find("uuid");
  if (it == m.content.end() || !it->is_string()) throw BadRequest("KeyError", "registration_request needs a 'uuid'");
  std::string uuid = it->get<std::string>();
  if (uuid.empty()) throw BadRequest("ValueError", "registration_request has an empty 'uuid'");
  if (engines_.uuid_known(uuid)) throw BadRequest("KeyError", "uuid '" + uuid + "' in use");
  int requested = -1;
  if (auto r = m.content.find("id"); r != m.content.end() && !r->is_null()) {
    if (!r->is_number_integer()) throw BadRequest("TypeError", "registration_request 'id' must be an integer");
    requested = r->get<int>();
  }
  int id = engines_.allocate_id(requested);
  Engine& e = engines_.add(id, uuid);
  if (const char* peer = zmq_msg_gets(const_cast<zmq::message_t&>(ident).handle(), "Peer-Address")) e.host = peer;
  e.pending_deadline_ms = mono_ms() + static_cast<std::int64_t>(opts_.registration_timeout_s * 1000);
  json info = {{"interface", engine_info_.interface}, {"registration", engine_info_.registration},
               {"control", engine_info_.control},     {"mux", engine_info_.mux},
               {"task", engine_info_.task},           {"iopub", engine_info_.iopub},
               {"hb_ping", engine_info_.hb_ping},     {"hb_pong", engine_info_.hb_pong},
               {"broadcast", engine_info_.broadcast}};
  PXF_LOG(info, kLog) << "registration::engine " << id << " (" << uuid << ") pending its first heartbeat";
  reply(ident, m, "registration_reply",
        {{"status", "ok"}, {"id", id}, {"hb_period", opts_.ping_ms}, {"connection_info", info}});
  heart_.ping_soon(mono_ms());  // ping now: registration completes on the first pong
}

void Hub::finish_registration(Engine& e) {
  engines_.mark_registered(e);
  e.missed_beats = 0;
  tasks_.add_engine(e.id);
  PXF_LOG(info, kLog) << "engine::engine " << e.id << " (" << e.uuid << ") registered";
  notify("registration_notification", {{"id", e.id}, {"uuid", e.uuid}});
  const std::int64_t now = mono_ms();
  forget_old_registrations(now);
  recent_.push_back({now, e.id, e.serial});
  tasks_.settle();
}

void Hub::on_unregistration_request(const Message& m) {
  auto it = m.content.find("id");
  if (it == m.content.end() || !it->is_number_integer()) {
    ++counters_["query.error"];
    PXF_LOG(info, kLog) << "unregistration_request without an integer id; ignored";
    return;
  }
  unregister(it->get<int>(), "unregistration_request");
}

void Hub::on_queue_request(const zmq::message_t& ident, const Message& m) {
  if (!m.content.contains("targets")) throw BadRequest("KeyError", "queue_request needs 'targets'");
  auto targets = validate_targets(m.content["targets"], engines_);
  auto verbose_it = m.content.find("verbose");
  bool verbose = verbose_it != m.content.end() && verbose_it->is_boolean() && verbose_it->get<bool>();
  json out = {{"status", "ok"}};
  static const std::unordered_set<std::string> none;
  static const IdLog none_list;
  for (int id : targets) {
    Engine* e = engines_.by_id(id);
    auto& q = e ? e->queue : none;
    auto& t = e ? e->tasks : none;
    const IdLog* retired = e ? nullptr : engines_.retired_completed(id);
    auto& c = e ? e->completed : retired ? *retired : none_list;
    if (verbose) out[std::to_string(id)] = {{"queue", json(q)}, {"completed", json(c.list())}, {"tasks", json(t)}};
    else out[std::to_string(id)] = {{"queue", q.size()}, {"completed", c.size()}, {"tasks", t.size()}};
  }
  if (verbose) {
    json ids = json::array();
    for (auto& id : tasks_.waiting_ids()) ids.push_back(std::move(id));
    out["unassigned"] = ids;
  } else {
    out["unassigned"] = tasks_.waiting_count();
  }
  reply(ident, m, "queue_reply", out);
}

namespace {
// Stock's NoDB raises this from every record lookup (ipyparallel.controller.dictdb.NoData).
[[noreturn]] void no_data() {
  throw BadRequest("NoData", "NoDB backend doesn't store any data. Start the Controller with a DB backend to "
                             "enable resubmission / result persistence.");
}
}  // namespace

void Hub::on_result_request(const zmq::message_t& ident, const Message& m) {
  auto ids_it = m.content.find("msg_ids");
  if (ids_it == m.content.end() || !ids_it->is_array()) throw BadRequest("KeyError", "result_request needs 'msg_ids'");
  std::vector<std::string> ids;
  for (auto& id : *ids_it) {
    if (!id.is_string()) throw BadRequest("TypeError", "msg_ids must be strings, not " + id.dump());
    ids.push_back(id.get<std::string>());
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  bool status_only = wire::get_or<bool>(m.content, "status_only", false);
  if (!records_.keeps() && !status_only) no_data();
  json out = {{"status", "ok"}, {"pending", json::array()}, {"completed", json::array()}};
  Frames buffers;
  for (auto& id : ids) {
    TaskRecord* r = records_.find(id);
    if (!r && records_.finished_unkept(id)) {  // NoDB: known finished, nothing kept
      out["completed"].push_back(id);
      continue;
    }
    if (!r) throw BadRequest("KeyError", "'No such message: " + id + "'");
    if (!r->completed) {
      out["pending"].push_back(id);
      continue;
    }
    out["completed"].push_back(id);
    if (status_only) continue;
    out[id] = TaskRecords::extract(*r);
    // Buffers in sorted msg_id order: the client reads one object per ok apply_reply.
    for (auto& b : r->result_buffers) buffers.push_back(wire::share(b));
  }
  reply(ident, m, "result_reply", out, std::move(buffers));
}

void Hub::on_history_request(const zmq::message_t& ident, const Message& m) {
  if (!records_.keeps()) no_data();
  reply(ident, m, "history_reply", {{"status", "ok"}, {"history", records_.history()}});
}

void Hub::on_db_request(const zmq::message_t& ident, const Message& m) {
  if (!records_.keeps()) no_data();
  // The query's key order matters (tests stop at the first failure): read it again, ordered.
  auto cv = view(m.content_frame);
  auto ordered = nlohmann::ordered_json::parse(cv.begin(), cv.end(), nullptr, false);
  nlohmann::ordered_json query = nlohmann::ordered_json::object();
  if (ordered.is_object() && ordered.contains("query")) query = ordered["query"];
  json keys = m.content.contains("keys") ? m.content["keys"] : json();
  RecordQuery q(query);
  std::vector<std::string> wanted;
  if (!keys.is_null()) {
    if (!keys.is_array()) throw BadRequest("TypeError", "keys must be a list of record keys, not " + keys.dump());
    for (auto& k : keys) {
      if (!k.is_string()) throw BadRequest("KeyError", k.dump());
      wanted.push_back(k.get<std::string>());
    }
    auto& known = TaskRecords::keys();
    for (auto& k : wanted)
      if (std::find(known.begin(), known.end(), k) == known.end()) throw BadRequest("KeyError", "'" + k + "'");
  }
  bool with_bufs = std::find(wanted.begin(), wanted.end(), "buffers") != wanted.end();
  bool with_rbufs = std::find(wanted.begin(), wanted.end(), "result_buffers") != wanted.end();
  json records = json::array();
  json buffer_lens = with_bufs ? json::array() : json();
  json result_buffer_lens = with_rbufs ? json::array() : json();
  Frames buffers;
  records_.for_each([&](const std::string& id, TaskRecord& r) {
    json rec = TaskRecords::to_json(id, r);
    if (!q.matches(rec)) return;
    if (!wanted.empty()) {
      json sub = {{"msg_id", id}};
      for (auto& k : wanted)
        if (k != "buffers" && k != "result_buffers") {
          auto it = rec.find(k);  // `label` is absent from records of requests without one
          sub[k] = it == rec.end() ? json() : *it;
        }
      rec = std::move(sub);
    }
    if (with_bufs) {
      buffer_lens.push_back(r.buffers.size());
      for (auto& b : r.buffers) buffers.push_back(wire::share(b));
    }
    if (with_rbufs) {
      result_buffer_lens.push_back(r.result_buffers.size());
      for (auto& b : r.result_buffers) buffers.push_back(wire::share(b));
    }
    records.push_back(std::move(rec));
  });
  reply(ident, m, "db_reply",
        {{"status", "ok"},
         {"records", std::move(records)},
         {"buffer_lens", buffer_lens},
         {"result_buffer_lens", result_buffer_lens}},
        std::move(buffers));
}

void Hub::on_purge_request(const zmq::message_t& ident, const Message& m) {
  json msg_ids = m.content.contains("msg_ids") ? m.content["msg_ids"] : json::array();
  json engine_ids = m.content.contains("engine_ids") ? m.content["engine_ids"] : json::array();
  if (msg_ids.is_string() && msg_ids.get<std::string>() == "all") {
    records_.drop_completed();
    return reply(ident, m, "purge_reply", {{"status", "ok"}});
  }
  if (!msg_ids.is_array())
    throw BadRequest("TypeError", "msg_ids must be a list of msg_ids or 'all', not " + msg_ids.dump());
  std::vector<std::string> ids;
  for (auto& id : msg_ids) {
    if (!id.is_string()) throw BadRequest("TypeError", "msg_ids must be strings, not " + id.dump());
    ids.push_back(id.get<std::string>());
  }
  for (auto& id : ids)
    if (TaskRecord* r = records_.find(id); r && !r->completed)
      throw BadRequest("IndexError", "msg pending: '" + id + "'");
  records_.drop(ids);
  if (engine_ids.is_null()) engine_ids = json::array();
  if (!engine_ids.is_array())
    throw BadRequest("TypeError", "engine_ids must be a list of engine ids, not " + engine_ids.dump());
  for (auto& eid : engine_ids) {
    if (!eid.is_number_integer()) throw BadRequest("TypeError", "engine ids must be integers, not " + eid.dump());
    Engine* e = engines_.by_id(eid.get<int>());
    if (!e || !e->registered) throw BadRequest("IndexError", "No such engine: " + eid.dump());
    records_.drop_engine(e->uuid);
  }
  reply(ident, m, "purge_reply", {{"status", "ok"}});
}

void Hub::on_resubmit_request(const zmq::message_t& ident, const Message& m) {
  auto it = m.content.find("msg_ids");
  if (it == m.content.end()) throw BadRequest("KeyError", "'msg_ids'");
  if (!it->is_array()) throw BadRequest("TypeError", "msg_ids must be a list of msg_ids, not " + it->dump());
  if (!records_.keeps()) no_data();
  std::vector<std::string> ids, missing;
  for (auto& id : *it) {
    if (!id.is_string()) throw BadRequest("TypeError", "msg_ids must be strings, not " + id.dump());
    ids.push_back(id.get<std::string>());
    if (!records_.find(ids.back())) missing.push_back(ids.back());
  }
  if (!missing.empty()) throw BadRequest("KeyError", "'No such msg(s): " + py_repr(missing) + "'");
  // Each goes through the task scheduler again as stock does: the old header with a new
  // msg_id and date, the old header as parent, metadata {}, the same content and buffers.
  json resubmitted = json::object();
  std::vector<Frames> outgoing;
  for (auto& id : ids) {
    if (resubmitted.contains(id)) continue;
    TaskRecord& r = *records_.find(id);
    json old_header = r.header_json();
    json header = old_header;
    json fresh = loop_.session().make_header(wire::get_or<std::string>(header, "msg_type", "apply_request"));
    header["msg_id"] = fresh["msg_id"];
    header["date"] = fresh["date"];
    json content = r.content.empty() ? json::object() : json::parse(r.content, nullptr, false);
    if (content.is_discarded()) content = json::object();
    Frames bufs;
    for (auto& b : r.buffers) bufs.push_back(wire::share(b));
    Frames ids_frames;
    ids_frames.push_back(wire::frame("pxf-hub-resubmit"));
    outgoing.push_back(
        loop_.session().encode(std::move(ids_frames), header, old_header, json::object(), content, std::move(bufs)));
    r.resubmitted = header["msg_id"].get<std::string>();
    resubmitted[id] = r.resubmitted;
  }
  reply(ident, m, "resubmit_reply", {{"status", "ok"}, {"resubmitted", resubmitted}});
  for (auto& f : outgoing) tasks_.on_task_submit(std::move(f), true);
}

void Hub::on_shutdown_request(const zmq::message_t& ident, const Message& m) {
  PXF_LOG(info, kLog) << "shutdown requested by a client; exiting in 1 s";
  reply(ident, m, "shutdown_reply", {{"status", "ok"}});
  notify("shutdown_notification", {{"status", "ok"}}, m.header);
  shutdown_at_ms_ = mono_ms() + 1000;
}

void Hub::on_stats_request(const zmq::message_t& ident, const Message& m) {
  // {"trim": true}: give freed heap back to the system first (for memory measurements).
  if (wire::get_or<bool>(m.content, "trim", false)) {
    memory::trim_heap();
    ++counters_["malloc_trim"];
  }
  json drops = json::object();
  for (std::size_t i = 1; i < static_cast<std::size_t>(wire::Drop::count_); ++i) {
    auto d = static_cast<wire::Drop>(i);
    drops[wire::to_string(d)] = loop_.session().drops().get(d);
  }
  json counters = counters_;
  for (std::size_t i = 0; i < EventLoop::kSources; ++i)
    counters[std::string("in.") + EventLoop::kSourceNames[i]] = loop_.received(i);
  counters["record_buffers.shared_identical"] = copier_.reused();
  reply(ident, m, link::kStatsReply,
        {{"status", "ok"},
         {"drops", drops},
         {"counters", counters},
         {"engines", engines_.registered_count()},
         {"waiting", tasks_.waiting_count()},
         {"in_flight", tasks_.in_flight_count()},
         {"records", records_.size()},
         {"record_bytes", records_.bytes()},
         {"task_outcomes", tasks_.outcomes_count()},
         {"dependency_graph", tasks_.graph_count()}});
}

void Hub::unregister(int id, const std::string& why) {
  Engine* e = engines_.by_id(id);
  if (!e) return;
  std::string uuid = e->uuid;
  std::uint64_t serial = e->serial;
  bool was_registered = e->registered;
  PXF_LOG(info, kLog) << "engine " << id << " (" << uuid << ") unregistered: " << why;
  tasks_.remove_engine(id);
  // Its load-balanced tasks go elsewhere (retries left) or fail now with EngineError: the
  // client fails only direct work itself.
  std::vector<std::string> stranded(e->tasks.begin(), e->tasks.end());
  if (!e->job.empty()) link_.retire(uuid, e->job);
  engines_.remove(id);
  if (was_registered) notify("unregistration_notification", {{"id", id}, {"uuid", uuid}});
  tasks_.strand_tasks(id, uuid, serial, stranded);
  // Coalescing broadcasts stop waiting for it (for a job, for the part that covers it).
  broadcasts_.engine_gone(uuid);
  tasks_.settle();
}

void Hub::unregister_all(const std::string& why) {
  std::vector<int> ids;
  for (auto& [id, e] : engines_.all()) ids.push_back(id);
  for (int id : ids) unregister(id, why);
}

}  // namespace pxf::controller
