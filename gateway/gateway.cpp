#include "gateway/gateway.hpp"

#include "conn/address.hpp"
#include "util/clock.hpp"
#include "util/log.hpp"

#include <algorithm>
#include <charconv>

namespace pxf::gateway {

using wire::frame;
using wire::view;

namespace {
constexpr const char* kLog = "gateway";

Frames share_all(Frames& in) {
  Frames out;
  out.reserve(in.size());
  for (auto& f : in) out.push_back(wire::share(f));
  return out;
}

std::size_t delimiter_index(const Frames& frames) {
  for (std::size_t i = 0; i < frames.size(); ++i)
    if (view(frames[i]) == wire::kDelimiter) return i;
  return frames.size();
}
}  // namespace

std::string bcast_key(const json& header, const json& metadata) {
  std::string key = wire::get_or<std::string>(metadata, "original_msg_id", "");
  if (key.empty()) key = wire::get_or<std::string>(header, "msg_id", "");
  return key;
}

Gateway::Gateway(zmq::context_t& ctx, GatewayOptions opts)
    : opts_(std::move(opts)),
      session_([&] {
        auto s = opts_.session;
        s.session_id = opts_.job_uuid;
        return s;
      }()),
      sock_(ctx, zmq::socket_type::dealer),
      ctx_(ctx) {
  sock_.set(zmq::sockopt::routing_id, opts_.job_uuid);
  sock_.set(zmq::sockopt::sndhwm, 0);
  sock_.set(zmq::sockopt::rcvhwm, 0);
  sock_.set(zmq::sockopt::linger, 2000);
  curve_ = CurveClient::for_server(opts_.curve_serverkey);
  curve_.apply(sock_);
  try {
    sock_.connect(opts_.url);
  } catch (const zmq::error_t& e) {
    throw GatewayError("cannot dial the controller at " + opts_.url + ": " + e.what());
  }
}

int Gateway::fd() { return sock_.get(zmq::sockopt::fd); }

void Gateway::send(Frames&& frames) {
  // SNDHWM 0: a send never blocks (the link is the job's only path; we do not drop).
  if (!zmq::send_multipart(sock_, frames)) PXF_LOG(error, kLog) << "link send failed (would block); message dropped";
  maybe_readable_ = true;
}

void Gateway::send_link(std::string_view msg_type, const json& content) {
  Frames ids;
  ids.push_back(frame(link::kLinkChannel));
  send(session_.build(std::move(ids), msg_type, content));
}

std::vector<int> Gateway::register_job(const std::vector<RankInfo>& ranks) {
  json engines = json::array();
  json hosts = json::array();
  uuids_.clear();
  for (std::size_t r = 0; r < ranks.size(); ++r) {
    engines.push_back({{"uuid", ranks[r].uuid}, {"rank", r}, {"id", r}});
    hosts.push_back(ranks[r].hostname);
    uuids_.push_back(ranks[r].uuid);
    rank_of_[ranks[r].uuid] = static_cast<int>(r);
  }
  send_link(link::kRegisterRequest, {{"engines", engines}, {"size", ranks.size()}, {"hostnames", hosts}});
  PXF_LOG(info, kLog) << "registering " << ranks.size() << " engines with " << opts_.url << " (job " << opts_.job_uuid
                      << ")";

  const std::int64_t deadline = mono_ms() + opts_.register_timeout_ms;
  std::string last_problem;
  for (;;) {
    std::int64_t left = deadline - mono_ms();
    if (left <= 0) break;
    zmq::pollitem_t item{sock_.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, std::chrono::milliseconds(left));
    if (!(item.revents & ZMQ_POLLIN)) continue;
    Frames frames;
    if (!zmq::recv_multipart(sock_, std::back_inserter(frames), zmq::recv_flags::dontwait)) continue;
    if (frames.empty() || view(frames[0]) != link::kLinkChannel) {
      last_problem = "unexpected message before registration";
      continue;
    }
    frames.erase(frames.begin());
    auto d = session_.decode(std::move(frames));
    if (!d) {
      if (d.reason == wire::Drop::bad_signature || d.reason == wire::Drop::unsigned_message)
        throw GatewayError("the controller's registration reply failed the signature check (" + d.detail +
                           "): the key in the engine connection file does not match the controller's");
      last_problem = "invalid registration reply: " + d.detail;
      continue;
    }
    auto& m = *d.msg;
    if (m.msg_type() != link::kRegisterReply) continue;
    const json& c = m.content;
    if (wire::get_or<std::string>(c, "status", "") != "ok") {
      std::string why = wire::get_or<std::string>(c, "evalue", "");
      if (why.empty()) why = c.dump();
      throw GatewayError("registration refused by the controller: " + why);
    }
    try {
      ids_ = c.at("ids").get<std::vector<int>>();
    } catch (const json::exception& e) {
      throw GatewayError(std::string("malformed pxf_register_reply (ids): ") + e.what());
    }
    if (ids_.size() != ranks.size())
      throw GatewayError(std::string(link::kRegisterReply) + " has " + std::to_string(ids_.size()) + " ids for " +
                         std::to_string(ranks.size()) + " engines");
    hb_period_ms_ = std::max(10, wire::get_or<int>(c, "hb_period", 3000));
    registered_.assign(ranks.size(), true);
    heart_ = std::make_unique<Heart>(ctx_, opts_.url, opts_.job_uuid, opts_.session, hb_period_ms_,
                                     opts_.max_heartbeat_misses, curve_);
    PXF_LOG(info, kLog) << "registered: engine ids " << ids_.front() << ".." << ids_.back() << ", heartbeat "
                        << hb_period_ms_ << " ms";
    return ids_;
  }
  // Say why: a TCP probe tells an unreachable address from a controller that did not answer.
  auto [host, port] = conn::split_tcp_url(opts_.url);
  std::string probe = conn::tcp_probe(host, port, 2000);
  std::string secs = std::to_string(opts_.register_timeout_ms / 1000.0).substr(0, 4);
  if (!probe.empty())
    throw GatewayError("cannot reach the controller at " + opts_.url + " from this host: " + probe +
                       ". Is pxcontroller running, and listening on an address this host can reach? (a "
                       "controller started with --ip=127.0.0.1 serves only its own host: start it with "
                       "--ip=* or --engine-ip=ADDR, or give the engines --location/--ssh)");
  throw GatewayError("no registration reply from the controller at " + opts_.url + " within " + secs +
                     " s, though a TCP connection works (is it a pxcontroller, and do the key and the "
                     "curve_serverkey in the connection file match the controller's?)" +
                     (last_problem.empty() ? "" : "; last problem: " + last_problem));
}

int Gateway::poll_link(Sink& sink) {
  int n = 0;
  while (maybe_readable_) {
    Frames frames;
    auto got = zmq::recv_multipart(sock_, std::back_inserter(frames), zmq::recv_flags::dontwait);
    if (!got) {
      maybe_readable_ = false;
      break;
    }
    ++n;
    if (frames.size() < 2) {
      PXF_LOG(warning, kLog) << "dropped a link message of " << frames.size() << " frames";
      continue;
    }
    std::string_view ch = view(frames[0]);
    if (ch == link::kLinkChannel) {
      on_link_control(std::move(frames), sink);
    } else if (ch == link::kMuxChannel || ch == link::kControlChannel || ch == link::kTaskChannel) {
      auto it = rank_of_.find(std::string(view(frames[1])));
      if (it == rank_of_.end()) {
        PXF_LOG(warning, kLog) << "dropped a " << ch << " request for unknown engine " << view(frames[1]);
        continue;
      }
      sink.to_rank(it->second, std::move(frames));
    } else if (ch == link::kBcastChannel) {
      on_bcast(std::move(frames), sink);
    } else {
      PXF_LOG(warning, kLog) << "dropped a link message on unknown channel '" << ch << "'";
    }
    if (ended_) break;
  }
  return n;
}

void Gateway::on_link_control(Frames&& frames, Sink& sink) {
  frames.erase(frames.begin());
  auto d = session_.decode(std::move(frames));
  if (!d) {
    PXF_LOG(warning, kLog) << "dropped a link control message: " << d.detail;
    return;
  }
  auto& m = *d.msg;
  const auto& type = m.msg_type();
  if (type == link::kHeartbeatReply) {
    // Heartbeats travel on the heart's own connection; nothing to do here.
  } else if (type == link::kShutdown) {
    std::string reason = wire::get_or<std::string>(m.content, "reason", "");
    PXF_LOG(info, kLog) << "controller asked the job to shut down" << (reason.empty() ? "" : ": " + reason);
    ended_ = true;
    sink.end_job(0, std::string(link::kShutdown) + " " + reason);
  } else if (type == link::kProbe) {
    // The controller checks that we are still connected; nothing to answer.
  } else if (type == link::kRegisterReply) {
    PXF_LOG(debug, kLog) << "ignoring a late pxf_register_reply";
  } else {
    PXF_LOG(warning, kLog) << "ignoring unknown link message " << type;
  }
}

void Gateway::on_bcast(Frames&& frames, Sink& sink) {
  Frames copy = share_all(frames);
  copy.erase(copy.begin());
  auto d = session_.decode(std::move(copy), {.parse_content = false, .check_replay = false});
  if (!d) {
    PXF_LOG(warning, kLog) << "dropped a bcast request: " << d.detail;
    return;
  }
  auto& m = *d.msg;
  if (wire::get_or<bool>(m.metadata, "is_coalescing", false)) {
    Pending p;
    p.started_ms = mono_ms();
    for (auto& f : m.identities) p.client_route.push_back(wire::clone(f));
    auto targets = m.metadata.find("targets");
    if (targets != m.metadata.end() && targets->is_array()) {
      for (const auto& t : *targets) {
        std::string uuid;
        if (t.is_array() && !t.empty() && t[0].is_string()) uuid = t[0].get<std::string>();
        else if (t.is_string()) uuid = t.get<std::string>();
        if (!rank_of_.count(uuid)) continue;
        p.awaited.insert(uuid);
        p.targets.push_back(uuid);
        p.target_pairs.push_back(t.is_array() ? t : json::array({uuid, ids_[rank_of_[uuid]]}));
      }
    }
    if (!p.targets.empty()) coalescing_[bcast_key(m.header, m.metadata)] = std::move(p);
  }
  sink.to_all(std::move(frames));
}

void Gateway::from_rank(Frames&& frames, Sink& sink) {
  if (frames.empty()) return;
  std::string_view ch = view(frames[0]);
  if (ch == link::kPartChannel) {
    on_part(std::move(frames));
  } else if (ch == link::kRankDownChannel) {
    int rank = -1;
    if (frames.size() >= 2) {
      auto v = view(frames[1]);
      std::from_chars(v.data(), v.data() + v.size(), rank);
    }
    if (rank < 0 || static_cast<std::size_t>(rank) >= registered_.size()) return;
    unregister({rank}, "shutdown");
    if (std::none_of(registered_.begin(), registered_.end(), [](bool b) { return b; })) {
      PXF_LOG(info, kLog) << "every engine of the job has shut down";
      ended_ = true;
      sink.end_job(0, "all engines shut down");
    }
  } else {
    send(std::move(frames));
  }
}

void Gateway::on_part(Frames&& frames) {
  // [pxf_part, key, uuid, <IDS|MSG>, sig, header, parent, metadata, content, buffers...]
  if (frames.size() < 9) return;
  std::string key(view(frames[1])), uuid(view(frames[2]));
  auto it = coalescing_.find(key);
  if (it == coalescing_.end()) {
    PXF_LOG(warning, kLog) << "dropped a coalescing reply for unknown broadcast " << key;
    return;
  }
  Pending& p = it->second;
  if (!p.awaited.erase(uuid)) {
    PXF_LOG(debug, kLog) << "coalesced broadcast " << key << ": dropped a part of " << uuid << " (not awaited)";
    return;
  }
  frames.erase(frames.begin(), frames.begin() + 3);
  p.parts[uuid] = std::move(frames);
  if (p.awaited.empty()) {
    if (!p.abandoned) finish_coalesced(key, p);
    coalescing_.erase(it);
  }
}

void Gateway::forget_rank(const std::string& uuid) {
  for (auto it = coalescing_.begin(); it != coalescing_.end();) {
    Pending& p = it->second;
    if (!p.awaited.erase(uuid)) {  // not a target, or its part is in
      ++it;
      continue;
    }
    auto t = std::find(p.targets.begin(), p.targets.end(), uuid);
    p.target_pairs.erase(p.target_pairs.begin() + (t - p.targets.begin()));
    p.targets.erase(t);
    if (!p.abandoned)
      PXF_LOG(info, kLog) << "coalesced broadcast " << it->first << " abandoned: engine " << uuid
                          << " went down before replying";
    p.abandoned = true;
    if (p.awaited.empty()) it = coalescing_.erase(it);
    else ++it;
  }
}

void Gateway::finish_coalesced(const std::string& key, Pending& p) {
  Frames& last = p.parts[p.targets.back()];
  Frames probe;
  for (auto& f : last) probe.push_back(wire::share(f));
  auto d = session_.decode(std::move(probe), {.parse_content = false, .check_replay = false});
  if (!d) {
    PXF_LOG(error, kLog) << "coalesced broadcast " << key << ": invalid reply from a rank: " << d.detail;
    return;
  }
  auto& m = *d.msg;
  json md = m.metadata;
  md["broadcast_targets"] = p.target_pairs;
  Frames buffers;
  for (const auto& uuid : p.targets) {
    auto& part = p.parts[uuid];
    std::size_t delim = delimiter_index(part);
    for (std::size_t i = delim + 6; i < part.size(); ++i) buffers.push_back(std::move(part[i]));
  }
  Frames route;
  route.push_back(frame(link::kBcastCoalescedChannel));
  for (auto& f : p.client_route) route.push_back(std::move(f));
  send(session_.encode_frames(std::move(route), std::move(m.header_frame), std::move(m.parent_frame),
                              frame(wire::dump_json(md)), std::move(m.content_frame), std::move(buffers)));
}

void Gateway::tick(Sink& sink) {
  if (ended_ || registered_.empty() || !heart_ || !heart_->controller_lost()) return;
  PXF_LOG(critical, kLog) << "lost the controller: " << heart_->why();
  ended_ = true;
  sink.end_job(1, "lost the controller");
}

void Gateway::unregister(const std::vector<int>& ranks, const std::string& reason) {
  json ids = json::array();
  for (int r : ranks) {
    if (r < 0 || static_cast<std::size_t>(r) >= registered_.size() || !registered_[r]) continue;
    registered_[r] = false;
    ids.push_back(ids_[r]);
    forget_rank(uuids_[static_cast<std::size_t>(r)]);
  }
  if (ids.empty()) return;
  send_link(link::kUnregister, {{"ids", ids}, {"reason", reason}});
}

void Gateway::close(const std::string& reason) {
  heart_.reset();
  if (sock_.handle() == nullptr) return;
  std::vector<int> all;
  for (std::size_t r = 0; r < registered_.size(); ++r) all.push_back(static_cast<int>(r));
  unregister(all, reason);
  sock_.close();
}

}  // namespace pxf::gateway
