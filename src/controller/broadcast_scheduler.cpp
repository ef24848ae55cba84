// The broadcast scheduler: fan-out and coalescing (broadcast_scheduler.hpp).
#include "controller/broadcast_scheduler.hpp"

#include "controller/errors.hpp"
#include "controller/relays.hpp"
#include "link/protocol.hpp"
#include "util/log.hpp"

#include <algorithm>

#include <map>

namespace pxf::controller {

using wire::view;

namespace {
Frames shared_buffers(Frames& bufs) {
  Frames out;
  out.reserve(bufs.size());
  for (auto& b : bufs) out.push_back(wire::share(b));
  return out;
}
}  // namespace

BroadcastScheduler::BroadcastScheduler(EventLoop& loop, EngineTable& engines, Relays& relays, zmq::socket_t& bcast_in,
                                       zmq::socket_t& bcast_out, zmq::socket_t& fabric)
    : loop_(loop),
      counters_(loop.counters()),
      engines_(engines),
      relays_(relays),
      bcast_in_(bcast_in),
      bcast_out_(bcast_out),
      fabric_(fabric) {}

void BroadcastScheduler::on_broadcast_submit(Frames&& frames) {
  Message m;
  if (!loop_.decode("bcast_in", std::move(frames), m,
                    {.parse_parent = false, .parse_metadata = true, .parse_content = false}))
    return;
  if (m.identities.empty()) return;
  const std::string orig = m.msg_id();
  bool coalescing = wire::get_or<bool>(m.metadata, "is_coalescing", false);
  auto targets_it = m.metadata.find("targets");
  if (targets_it == m.metadata.end() || !targets_it->is_array()) {
    zmq::message_t client = std::move(m.identities.front());
    relays_.reject_request(bcast_in_, std::move(client), m,
                           error_content("ValueError", "broadcast request without metadata.targets", ""), "bcast_in");
    return;
  }
  std::string client(view(m.identities.front()));
  m.metadata["original_msg_id"] = orig;

  Broadcast b;
  b.client = client;
  std::map<std::string, std::size_t> job_part;  // job uuid -> index in b.parts
  for (auto& t : *targets_it) {
    if (!t.is_array() || t.size() != 2 || !t[0].is_string()) continue;
    std::string uuid = t[0].get<std::string>();
    Engine* e = engines_.by_uuid(uuid);
    if (!e || !e->registered) {
      // The stock scheduler would send into the void; answer for that engine instead.
      PXF_LOG(info, "broadcast") << "target " << uuid << " of " << orig << " is not registered";
      if (!coalescing) {
        Message per;  // headers only: frames are not needed for an error reply
        per.header = m.header;
        per.header["msg_id"] = orig + "_" + uuid;
        per.metadata = m.metadata;
        relays_.reject_request(bcast_in_, wire::frame(client), per,
                               error_content("EngineError", "No such engine: '" + uuid + "' is not registered"),
                               "bcast_in");
      }
      continue;
    }
    if (e->job.empty()) {
      BroadcastPart p;
      p.targets.emplace_back(uuid, e->id);
      b.parts.push_back(std::move(p));
      continue;
    }
    auto [it, fresh] = job_part.emplace(e->job, b.parts.size());
    if (fresh) {
      BroadcastPart p;
      p.job = e->job;
      b.parts.push_back(std::move(p));
    }
    b.parts[it->second].targets.emplace_back(uuid, e->id);
  }

  zmq::message_t metadata = wire::frame(wire::dump_json(m.metadata));
  for (auto& part : b.parts) {
    if (part.job.empty()) {
      const std::string& uuid = part.targets.front().first;
      json header = m.header;
      header["msg_id"] = orig + "_" + uuid;
      Frames ids;
      ids.push_back(wire::frame(uuid));
      ids.push_back(wire::frame(client));
      loop_.send(bcast_out_,
                 loop_.session().encode_frames(std::move(ids), wire::frame(wire::dump_json(header)),
                                               wire::share(m.parent_frame), wire::share(metadata),
                                               wire::share(m.content_frame), shared_buffers(m.buffers)),
                 "bcast_out");
    } else {
      // One message for all of this job's targets; the original header, this job's targets.
      json md = m.metadata;
      json ts = json::array();
      for (auto& [uuid, id] : part.targets) ts.push_back({uuid, id});
      md["targets"] = ts;
      Frames ids;
      ids.push_back(wire::frame(part.job));
      ids.push_back(wire::frame(link::kBcastChannel));
      ids.push_back(wire::frame(client));
      ++counters_["fabric.bcast_out"];
      loop_.send(fabric_,
                 loop_.session().encode_frames(std::move(ids), wire::share(m.header_frame), wire::share(m.parent_frame),
                                               wire::frame(wire::dump_json(md)), wire::share(m.content_frame),
                                               shared_buffers(m.buffers)),
                 "fabric");
    }
  }
  ++counters_["broadcast.requests"];
  if (coalescing && !b.parts.empty()) {
    b.remaining = b.parts.size();
    broadcasts_.emplace(orig, std::move(b));
  }
}

void BroadcastScheduler::on_broadcast_reply(Frames&& frames) {
  Message m;
  if (!loop_.decode(
          "bcast_out", std::move(frames), m,
          {.parse_parent = false, .parse_metadata = true, .parse_content = false, .header_fields_only = true}))
    return;
  if (m.identities.size() < 2) return;
  bool coalescing = wire::get_or<bool>(m.metadata, "is_coalescing", false);
  if (!coalescing) {
    m.identities.erase(m.identities.begin());  // the client sees [DELIM, ...]
    loop_.send(bcast_in_, wire::Session::forward(std::move(m)), "bcast_in");
    return;
  }
  std::string orig = wire::get_or<std::string>(m.metadata, "original_msg_id", "");
  Broadcast* found = find_broadcast(orig);
  if (!found) return;
  Broadcast& b = *found;
  std::string uuid(view(m.identities.front()));
  for (std::size_t i = 0; i < b.parts.size(); ++i) {
    auto& p = b.parts[i];
    if (!p.job.empty() || p.done || p.targets.front().first != uuid) continue;
    p.reply = std::move(m);
    b.last = i;
    return part_done(orig, b, i);
  }
  ++counters_["broadcast.unexpected_reply"];
}

void BroadcastScheduler::on_coalesced_part(const std::string& job, Frames&& frames) {
  Message m;
  if (!loop_.decode("fabric.bcast_coalesced", std::move(frames), m,
                    {.parse_parent = false, .parse_metadata = true, .parse_content = false}))
    return;
  if (m.identities.empty()) return;
  std::string orig = wire::get_or<std::string>(m.metadata, "original_msg_id", "");
  Broadcast* found = find_broadcast(orig);
  if (!found) return;
  Broadcast& b = *found;
  if (b.parts.size() == 1 && b.parts[0].job == job) {
    // The whole broadcast was this job's: its message goes to the client as it is.
    m.identities.resize(1);
    loop_.send(bcast_in_, wire::Session::forward(std::move(m)), "bcast_in");
    broadcasts_.erase(orig);
    return;
  }
  for (std::size_t i = 0; i < b.parts.size(); ++i) {
    auto& p = b.parts[i];
    if (p.job != job || p.done) continue;
    p.reply = std::move(m);
    b.last = i;
    return part_done(orig, b, i);
  }
  ++counters_["broadcast.unexpected_reply"];
}

BroadcastScheduler::Broadcast* BroadcastScheduler::find_broadcast(const std::string& orig_id) {
  auto it = broadcasts_.find(orig_id);
  if (it != broadcasts_.end()) return &it->second;
  ++counters_["broadcast.unexpected_reply"];
  return nullptr;
}

void BroadcastScheduler::part_done(const std::string& orig_id, Broadcast& b, std::size_t part) {
  if (b.parts[part].done) return;
  b.parts[part].done = true;
  if (--b.remaining == 0) emit_coalesced(orig_id, b);
}

// One reply for all targets: header/parent/content of the last reply, its metadata plus
// broadcast_targets, and every reply's buffers in target order.
void BroadcastScheduler::emit_coalesced(const std::string& orig_id, Broadcast& b) {
  if (b.last) {
    Message& last = *b.parts[*b.last].reply;
    json md = last.metadata;
    json bt = json::array();
    Frames bufs;
    for (auto& p : b.parts) {
      if (!p.reply) continue;
      if (p.job.empty()) {
        bt.push_back({p.targets.front().first, p.targets.front().second});
      } else {
        for (auto& t : wire::get_or<json>(p.reply->metadata, "broadcast_targets", json::array())) bt.push_back(t);
      }
      for (auto& buf : p.reply->buffers) bufs.push_back(std::move(buf));
    }
    md["broadcast_targets"] = bt;
    Frames ids;
    ids.push_back(wire::frame(b.client));
    loop_.send(bcast_in_,
               loop_.session().encode_frames(std::move(ids), std::move(last.header_frame), std::move(last.parent_frame),
                                             wire::frame(wire::dump_json(md)), std::move(last.content_frame),
                                             std::move(bufs)),
               "bcast_in");
  }
  broadcasts_.erase(orig_id);
}

void BroadcastScheduler::engine_gone(const std::string& uuid) {
  std::vector<std::pair<std::string, std::size_t>> gone;
  for (auto& [orig, b] : broadcasts_)
    for (std::size_t i = 0; i < b.parts.size(); ++i)
      if (!b.parts[i].done && b.parts[i].targets.size() &&
          std::any_of(b.parts[i].targets.begin(), b.parts[i].targets.end(), [&](auto& t) { return t.first == uuid; }))
        gone.emplace_back(orig, i);
  for (auto& [orig, i] : gone)
    if (auto it = broadcasts_.find(orig); it != broadcasts_.end()) part_done(orig, it->second, i);
}

}  // namespace pxf::controller
