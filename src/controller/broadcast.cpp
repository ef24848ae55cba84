// The broadcast scheduler (protocol §3.6): one request fans out to every target with
// msg_id "<original>_<uuid>"; replies are relayed one by one or coalesced into one.
#include "controller/controller.hpp"
#include "controller/errors.hpp"
#include "util/log.hpp"

namespace pxf::controller {

using wire::view;

// Client submits: [C, DELIM, ...] with metadata.targets = [[uuid, id], ...].
void Controller::on_broadcast_submit(Frames&& frames) {
  Message m;
  if (!decode("bcast_in", std::move(frames), m, false)) return;
  if (m.identities.empty()) return;
  const std::string orig = m.msg_id();
  bool coalescing = wire::get_or<bool>(m.metadata, "is_coalescing", false);
  auto targets_it = m.metadata.find("targets");
  if (targets_it == m.metadata.end() || !targets_it->is_array()) {
    zmq::message_t client = std::move(m.identities.front());
    reject_request(bcast_in_, std::move(client), m,
                   error_content("ValueError", "broadcast request without metadata.targets", ""), "bcast_in");
    return;
  }
  std::vector<std::pair<std::string, int>> targets;
  for (auto& t : *targets_it) {
    if (!t.is_array() || t.size() != 2 || !t[0].is_string()) continue;
    targets.emplace_back(t[0].get<std::string>(), t[1].is_number_integer() ? t[1].get<int>() : -1);
  }
  m.metadata["original_msg_id"] = orig;
  zmq::message_t metadata = wire::frame(wire::dump_json(m.metadata));
  std::string client(view(m.identities.front()));

  Broadcast b;
  b.client = client;
  for (auto& [uuid, id] : targets) {
    Engine* e = engines_.by_uuid(uuid);
    if (!e || !e->registered) {
      // The stock scheduler would send into the void; answer for that engine instead.
      PXF_LOG(info, "broadcast") << "target " << uuid << " of " << orig << " is not registered";
      if (!coalescing) {
        Message per;  // headers only: frames are not needed for an error reply
        per.header = m.header;
        per.header["msg_id"] = orig + "_" + uuid;
        per.metadata = m.metadata;
        reject_request(bcast_in_, wire::frame(client), per,
                       error_content("EngineError", "No such engine: '" + uuid + "' is not registered"), "bcast_in");
      }
      continue;
    }
    json header = m.header;
    header["msg_id"] = orig + "_" + uuid;
    Frames ids;
    ids.push_back(wire::frame(uuid));
    ids.push_back(wire::frame(client));
    Frames bufs;
    bufs.reserve(m.buffers.size());
    for (auto& buf : m.buffers) bufs.push_back(wire::share(buf));
    send(bcast_out_,
         session_->encode_frames(std::move(ids), wire::frame(wire::dump_json(header)), wire::share(m.parent_frame),
                                 wire::share(metadata), wire::share(m.content_frame), std::move(bufs)),
         "bcast_out");
    b.targets.emplace_back(uuid, e->id);
  }
  ++counters_["broadcast.requests"];
  if (coalescing && !b.targets.empty()) {
    b.replies.resize(b.targets.size());
    b.remaining = b.targets.size();
    broadcasts_.emplace(orig, std::move(b));
  }
}

// Engine replies: [E, C, DELIM, ...].
void Controller::on_broadcast_reply(Frames&& frames) {
  Message m;
  if (!decode("bcast_out", std::move(frames), m, false)) return;
  if (m.identities.size() < 2) return;
  bool coalescing = wire::get_or<bool>(m.metadata, "is_coalescing", false);
  if (!coalescing) {
    m.identities.erase(m.identities.begin());  // the client sees [DELIM, ...]
    send(bcast_in_, wire::Session::forward(std::move(m)), "bcast_in");
    return;
  }
  std::string orig = wire::get_or<std::string>(m.metadata, "original_msg_id", "");
  auto it = broadcasts_.find(orig);
  if (it == broadcasts_.end()) {
    ++counters_["broadcast.unexpected_reply"];
    return;
  }
  Broadcast& b = it->second;
  std::string uuid(view(m.identities.front()));
  for (std::size_t i = 0; i < b.targets.size(); ++i) {
    if (b.targets[i].first != uuid || b.replies[i]) continue;
    b.replies[i] = std::move(m);
    b.last = i;
    if (--b.remaining == 0) emit_coalesced(orig, b);
    return;
  }
  ++counters_["broadcast.unexpected_reply"];
}

// One reply for all targets: header/parent/content of the last reply, its metadata plus
// broadcast_targets, and every reply's buffers in target order.
void Controller::emit_coalesced(const std::string& orig_id, Broadcast& b) {
  if (b.last) {
    Message& last = *b.replies[*b.last];
    json md = last.metadata;
    json bt = json::array();
    Frames bufs;
    for (std::size_t i = 0; i < b.targets.size(); ++i) {
      if (!b.replies[i]) continue;
      bt.push_back({b.targets[i].first, b.targets[i].second});
      for (auto& buf : b.replies[i]->buffers) bufs.push_back(std::move(buf));
    }
    md["broadcast_targets"] = bt;
    Frames ids;
    ids.push_back(wire::frame(b.client));
    send(bcast_in_,
         session_->encode_frames(std::move(ids), std::move(last.header_frame), std::move(last.parent_frame),
                                 wire::frame(wire::dump_json(md)), std::move(last.content_frame), std::move(bufs)),
         "bcast_in");
  }
  broadcasts_.erase(orig_id);
}

} // namespace pxf::controller
