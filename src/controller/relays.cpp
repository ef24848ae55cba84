// Direct (mux) and control relays, and the iopub relay (relays.hpp).
#include "controller/relays.hpp"

#include "controller/errors.hpp"
#include "controller/hub.hpp"
#include "controller/job_link.hpp"
#include "link/protocol.hpp"
#include "util/log.hpp"

namespace pxf::controller {

using wire::view;

namespace {
std::string reply_type_for(const std::string& request_type) {
  constexpr std::string_view suffix = "_request";
  if (request_type.ends_with(suffix)) return request_type.substr(0, request_type.size() - suffix.size()) + "_reply";
  return request_type + "_reply";
}
}  // namespace

Relays::Relays(EventLoop& loop, EngineTable& engines, TaskRecords& records, JobLink& link, Hub& hub,
               zmq::socket_t& mux_in, zmq::socket_t& control_in, zmq::socket_t& iopub_out)
    : loop_(loop),
      counters_(loop.counters()),
      engines_(engines),
      records_(records),
      link_(link),
      hub_(hub),
      mux_in_(mux_in),
      control_in_(control_in),
      iopub_out_(iopub_out) {}

void Relays::reject_request(zmq::socket_t& s, zmq::message_t client, Message& m, const json& content,
                            const char* channel) {
  ++counters_[std::string("rejected.") + channel];
  Frames ids;
  ids.push_back(std::move(client));
  json md = {{"status", "error"}, {"dependencies_met", true}};
  if (m.metadata.contains("is_broadcast")) {
    md["is_broadcast"] = m.metadata["is_broadcast"];
    md["is_coalescing"] = false;
    md["original_msg_id"] = m.metadata.value("original_msg_id", "");
  }
  loop_.send(s, loop_.session().build(std::move(ids), reply_type_for(m.msg_type()), content, m.header, md), channel);
}

void Relays::on_client_direct(Frames&& frames, bool control) {
  const char* channel = control ? "control_in" : "mux_in";
  Message m;
  if (!loop_.decode(channel, std::move(frames), m,
                    {.parse_parent = false, .parse_metadata = true, .parse_content = false}))
    return;
  if (m.identities.size() < 2) {
    ++counters_[std::string("drop.") + channel + ".no_target"];
    PXF_LOG(warning, "relay") << channel << ": request " << m.msg_id() << " names no engine; dropped";
    return;
  }
  Engine* e = engines_.by_uuid(view(m.identities[1]));
  if (!e || !e->registered) {
    std::string target(view(m.identities[1]));
    PXF_LOG(info, "relay") << channel << ": " << m.msg_type() << " for unknown engine '" << target << "'";
    zmq::message_t client = std::move(m.identities[0]);
    reject_request(control ? control_in_ : mux_in_, std::move(client), m,
                   error_content("EngineError", "No such engine: '" + target + "' is not registered"), channel);
    return;
  }
  if (!control) {
    e->queue.insert(m.msg_id());
    records_.add(m.msg_id(), m, "mux").engine_uuid = e->uuid;
  }
  std::swap(m.identities[0], m.identities[1]);
  link_.send_to_engine(control ? link::kControlChannel : link::kMuxChannel, *e, wire::Session::forward(std::move(m)));
}

void Relays::on_engine_direct(Frames&& frames, bool control) {
  const char* channel = control ? "control_out" : "mux_out";
  Message m;
  if (!loop_.decode(
          channel, std::move(frames), m,
          {.parse_parent = true, .parse_metadata = false, .parse_content = false, .header_fields_only = true}))
    return;
  if (m.identities.size() < 2) {
    ++counters_[std::string("drop.") + channel + ".no_client"];
    return;
  }
  if (!control) {
    if (Engine* e = engines_.by_uuid(view(m.identities[0]))) {
      std::string parent = m.parent_msg_id();
      records_.complete(parent, m);
      if (e->queue.erase(parent)) e->completed.push_back(parent);
    }
  }
  std::swap(m.identities[0], m.identities[1]);
  loop_.send(control ? control_in_ : mux_in_, wire::Session::forward(std::move(m)), control ? "control_in" : "mux_in");
}

void Relays::on_iopub(Frames&& frames) {
  Message m;
  if (!loop_.decode(
          "iopub", std::move(frames), m,
          {.parse_parent = false, .parse_metadata = false, .parse_content = false, .header_fields_only = true}))
    return;
  // A shutdown_reply on iopub means that engine is leaving (protocol §4.6).
  if (m.msg_type() == "shutdown_reply") {
    if (Engine* e = engines_.by_uuid(m.session())) {
      int id = e->id;
      loop_.send(iopub_out_, wire::Session::forward(std::move(m)), "iopub_out");
      hub_.unregister(id, "shutdown_reply on iopub");
      return;
    }
  }
  // Output of a recorded task goes into its record, for result_request.
  const std::string& type = m.msg_type();
  if (type == "stream" || type == "execute_input" || type == "execute_result" || type == "error") {
    auto pv = view(m.parent_frame);
    json parent_header = json::parse(pv.begin(), pv.end(), nullptr, false);
    std::string parent = wire::get_or<std::string>(parent_header, "msg_id", "");
    if (records_.find(parent)) {
      auto v = view(m.content_frame);
      json content = json::parse(v.begin(), v.end(), nullptr, false);
      if (content.is_object()) records_.add_output(parent, type, content);
    }
  }
  loop_.send(iopub_out_, wire::Session::forward(std::move(m)), "iopub_out");
}

}  // namespace pxf::controller
