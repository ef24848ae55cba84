#include "controller/controller.hpp"

#include "controller/errors.hpp"
#include "util/clock.hpp"
#include "util/ids.hpp"
#include "util/log.hpp"

#include <sys/epoll.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <climits>
#include <cstring>
#include <system_error>

namespace pxf::controller {

using wire::view;

namespace {
constexpr const char* kLog = "controller";
constexpr std::size_t kBatch = 256;  // messages drained per socket per poll, for fairness

std::string hostname() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "localhost";
  return buf;
}
} // namespace

Controller::Controller(Options opts)
    : opts_(std::move(opts)), balancer_(opts_.scheme, opts_.hwm),
      records_(RecordLimits{opts_.record_limit, opts_.size_limit, opts_.cull_fraction, opts_.keep_records}) {
  location_ = conn::resolve_profile(opts_.profile);
  port_pool_ = opts_.ports;
  if (opts_.location.empty()) opts_.location = hostname();
  if (opts_.engine_ip.empty()) opts_.engine_ip = opts_.ip;
  if (opts_.client_ip.empty()) opts_.client_ip = opts_.ip;
  if (opts_.registration_timeout_s <= 0) opts_.registration_timeout_s = std::max(30.0, opts_.ping_ms / 100.0);
}

Controller::~Controller() {
  remove_connection_files();
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
}

zmq::socket_t Controller::make_router(const char* routing_id) {
  zmq::socket_t s(ctx_, zmq::socket_type::router);
  if (routing_id) s.set(zmq::sockopt::routing_id, zmq::const_buffer(routing_id, std::strlen(routing_id)));
  // Sending to a peer that is gone raises EHOSTUNREACH, which we count, instead of a silent drop.
  s.set(zmq::sockopt::router_mandatory, 1);
  return s;
}

int Controller::bind(zmq::socket_t& s, const std::string& ip) {
  s.set(zmq::sockopt::sndhwm, 0);
  s.set(zmq::sockopt::rcvhwm, 0);
  s.set(zmq::sockopt::linger, 1000);
  if (opts_.curve) {
    s.set(zmq::sockopt::curve_server, 1);
    s.set(zmq::sockopt::curve_secretkey, opts_.curve_secretkey);
  }
  std::string host = (ip == "*" || ip == "0.0.0.0") ? "*" : ip;
  int port = 0;
  if (!port_pool_.empty()) {
    port = port_pool_.front();
    port_pool_.erase(port_pool_.begin());
  }
  s.bind("tcp://" + host + ":" + (port ? std::to_string(port) : std::string("*")));
  std::string ep = s.get(zmq::sockopt::last_endpoint);
  return std::stoi(ep.substr(ep.rfind(':') + 1));
}

void Controller::start() {
  conn::ensure_profile_dirs(location_);
  std::optional<conn::ClientInfo> old_client;
  std::optional<conn::EngineInfo> old_engine;
  if (opts_.reuse && std::filesystem::exists(location_.client_file()) &&
      std::filesystem::exists(location_.engine_file())) {
    old_client = conn::read_client_file(location_.client_file());
    old_engine = conn::read_engine_file(location_.engine_file());
    PXF_LOG(info, kLog) << "--reuse: reusing key and ports of " << location_.client_file().string();
  }
  std::string key = opts_.key_given ? opts_.key : (old_client ? old_client->key : new_id());
  wire::SessionOptions so;
  so.key = key;
  so.signature_scheme = opts_.signature_scheme;
  if (opts_.max_message_bytes) so.limits.max_frame_bytes = opts_.max_message_bytes;
  session_ = std::make_unique<wire::Session>(so);

  if (opts_.curve && opts_.curve_secretkey.empty()) {
    char pub[41] = {}, sec[41] = {};
    if (zmq_curve_keypair(pub, sec) != 0)
      throw std::runtime_error("--curve: this libzmq has no CurveZMQ (zmq_curve_keypair failed: " +
                               std::string(zmq_strerror(zmq_errno())) + ")");
    opts_.curve_publickey = pub;
    opts_.curve_secretkey = sec;
  }

  // With --reuse the old ports go first in the pool, in the order sockets are bound below.
  if (old_client && old_engine) {
    port_pool_ = {old_client->registration, old_client->mux,     old_engine->mux,
                  old_client->control,      old_engine->control, old_client->task,
                  old_engine->task,         old_client->broadcast};
    for (int p : old_engine->broadcast) port_pool_.push_back(p);
    for (int p : {old_engine->iopub, old_client->iopub, old_client->notification, old_engine->hb_ping,
                  old_engine->hb_pong})
      port_pool_.push_back(p);
  } else if (opts_.registration_port) {
    port_pool_.insert(port_pool_.begin(), opts_.registration_port);
  }

  // The registration socket serves clients and engines: one wildcard bind covers both when
  // either side listens everywhere; otherwise it binds on both addresses, as stock does.
  auto wildcard = [](const std::string& ip) { return ip == "*" || ip == "0.0.0.0"; };
  bool any = wildcard(opts_.client_ip) || wildcard(opts_.engine_ip);
  query_ = make_router(nullptr);
  int reg = bind(query_, any ? "*" : opts_.client_ip);
  if (!any && opts_.engine_ip != opts_.client_ip) query_.bind("tcp://" + opts_.engine_ip + ":" + std::to_string(reg));
  mux_in_ = make_router("mux_in");
  int mux_c = bind(mux_in_, opts_.client_ip);
  mux_out_ = make_router("mux_out");
  int mux_e = bind(mux_out_, opts_.engine_ip);
  control_in_ = make_router("control_in");
  int ctl_c = bind(control_in_, opts_.client_ip);
  control_out_ = make_router("control_out");
  int ctl_e = bind(control_out_, opts_.engine_ip);
  task_in_ = make_router("task_in");
  int task_c = bind(task_in_, opts_.client_ip);
  task_out_ = make_router("task_out");
  int task_e = bind(task_out_, opts_.engine_ip);
  bcast_in_ = make_router("sub_scheduler_0");
  int bc_c = bind(bcast_in_, opts_.client_ip);
  // One engine-facing broadcast socket bound on every leaf port: each engine connects to one.
  bcast_out_ = make_router("sub_scheduler_00");
  std::vector<int> bc_e;
  for (int i = 0; i < std::max(1, opts_.broadcast_leaves); ++i) bc_e.push_back(bind(bcast_out_, opts_.engine_ip));
  iopub_in_ = zmq::socket_t(ctx_, zmq::socket_type::sub);
  iopub_in_.set(zmq::sockopt::subscribe, "");
  int iopub_e = bind(iopub_in_, opts_.engine_ip);
  iopub_out_ = zmq::socket_t(ctx_, zmq::socket_type::pub);
  int iopub_c = bind(iopub_out_, opts_.client_ip);
  notifier_ = zmq::socket_t(ctx_, zmq::socket_type::pub);
  int notif = bind(notifier_, opts_.client_ip);
  hb_ping_ = zmq::socket_t(ctx_, zmq::socket_type::pub);
  int ping = bind(hb_ping_, opts_.engine_ip);
  hb_pong_ = make_router(nullptr);
  hb_pong_.set(zmq::sockopt::router_mandatory, 0);
  int pong = bind(hb_pong_, opts_.engine_ip);
  fabric_ = make_router(nullptr);
  int fabric = bind(fabric_, opts_.engine_ip);
  const std::string monitor_ep = "inproc://pxf-fabric-monitor";
  constexpr int kHandshakeFailed =
      ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH;
  if (zmq_socket_monitor(fabric_.handle(), monitor_ep.c_str(), ZMQ_EVENT_DISCONNECTED | (opts_.curve ? kHandshakeFailed : 0)) != 0)
    throw zmq::error_t();
  if (opts_.curve) {
    const std::string query_ep = "inproc://pxf-query-monitor";
    if (zmq_socket_monitor(query_.handle(), query_ep.c_str(), kHandshakeFailed) != 0) throw zmq::error_t();
    query_monitor_ = zmq::socket_t(ctx_, zmq::socket_type::pair);
    query_monitor_.connect(query_ep);
  }
  fabric_monitor_ = zmq::socket_t(ctx_, zmq::socket_type::pair);
  fabric_monitor_.connect(monitor_ep);
  setup_event_loop();

  auto common = [&](conn::Common& c, const std::string& ip) {
    c.interface = "tcp://" + ip;
    c.location = opts_.location;
    c.key = key;
    c.signature_scheme = opts_.signature_scheme;
    if (opts_.curve) c.curve_serverkey = opts_.curve_publickey;
  };
  common(client_info_, opts_.client_ip);
  client_info_.ssh = opts_.ssh_server;
  client_info_.registration = reg;
  client_info_.control = ctl_c;
  client_info_.mux = mux_c;
  client_info_.task = task_c;
  client_info_.task_scheme = opts_.scheme;
  client_info_.iopub = iopub_c;
  client_info_.notification = notif;
  client_info_.broadcast = bc_c;
  common(engine_info_, opts_.engine_ip);
  engine_info_.ssh = opts_.engine_ssh_server;
  engine_info_.registration = reg;
  engine_info_.control = ctl_e;
  engine_info_.mux = mux_e;
  engine_info_.task = task_e;
  engine_info_.iopub = iopub_e;
  engine_info_.hb_ping = ping;
  engine_info_.hb_pong = pong;
  engine_info_.broadcast = bc_e;
  engine_info_.pxf_fabric = fabric;

  write_connection_files();
  for (auto& w : opts_.warnings) PXF_LOG(warning, kLog) << w;
  auto loopback = [](const std::string& ip) { return ip.rfind("127.", 0) == 0 || ip == "localhost" || ip == "::1"; };
  if (opts_.curve)
    PXF_LOG(info, kLog) << "CurveZMQ on every socket; the public key is curve_serverkey in the connection files";
  else if (!loopback(opts_.client_ip) || !loopback(opts_.engine_ip))
    PXF_LOG(warning, kLog) << "listening on a network (" << (loopback(opts_.client_ip) ? opts_.engine_ip : opts_.client_ip)
                           << ") without encryption: messages are signed, not encrypted; add --curve "
                              "(IPController.enable_curve=True or IPP_ENABLE_CURVE=1) to encrypt them";
  if (opts_.keep_records)
    PXF_LOG(info, kLog) << "task records: in memory (DictDB), up to " << opts_.record_limit << " records and "
                        << opts_.size_limit << " buffer bytes";
  else
    PXF_LOG(info, kLog) << "task records: none kept (NoDB)";
  next_beat_ms_ = mono_ms() + opts_.ping_ms;
  PXF_LOG(info, kLog) << "listening on " << client_info_.interface << " (registration port " << reg
                      << "); connection files in " << location_.security_dir().string();
}

void Controller::write_connection_files() {
  conn::write_atomic(location_.client_file(), conn::to_json(client_info_));
  conn::write_atomic(location_.engine_file(), conn::to_json(engine_info_));
  files_written_ = true;
}

void Controller::remove_connection_files() {
  if (!files_written_ || opts_.reuse) return;
  std::error_code ec;
  std::filesystem::remove(location_.client_file(), ec);
  std::filesystem::remove(location_.engine_file(), ec);
  files_written_ = false;
}

int Controller::run() {
  while (!stop_requested_) {
    std::int64_t now = mono_ms();
    std::int64_t next = next_beat_ms_;
    if (next_fast_ping_ms_) next = std::min(next, next_fast_ping_ms_);
    if (shutdown_at_ms_) next = std::min(next, shutdown_at_ms_);
    if (fabric_probe_at_ms_) next = std::min(next, fabric_probe_at_ms_);
    if (!timeouts_.empty()) next = std::min(next, std::get<0>(timeouts_.top()));
    if (trim_at_ms_) next = std::min(next, trim_at_ms_);
    poll_once(std::clamp<std::int64_t>(next - now, 0, 1000));
    on_timers();
    if (shutdown_at_ms_ && mono_ms() >= shutdown_at_ms_) break;
  }
  PXF_LOG(info, kLog) << "stopping; dropped messages: " << session_->drops().summary();
  // Clients see the engines go (unregistration notifications) and their outstanding work fail
  // with EngineError, instead of waiting forever on a controller that is gone (stock's
  // ipcontroller just exits). A batch job's end stops its controller this way.
  std::vector<int> ids;
  for (auto& [id, e] : engines_.all()) ids.push_back(id);
  for (int id : ids) unregister(id, "the controller is exiting");
  // MPI jobs end with the controller (stock engines would wait out their heartbeat misses);
  // all of it delivered within the sockets' 1 s linger.
  for (auto& [job, j] : jobs_) send_link(job, "pxf_shutdown", {{"reason", "the controller is exiting"}}, json::object());
  remove_connection_files();
  return 0;
}

const std::array<const char*, Controller::kSources> Controller::kSourceNames = {
    "query", "mux_in", "mux_out", "control_in", "control_out", "task_in",
    "task_out", "bcast_in", "bcast_out", "iopub", "hb", "fabric"};

void Controller::setup_event_loop() {
  polled_ = {&query_,     &mux_in_,   &mux_out_,  &control_in_, &control_out_, &task_in_, &task_out_,
             &bcast_in_, &bcast_out_, &iopub_in_, &hb_pong_,    &fabric_,      &fabric_monitor_};
  epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  if (epoll_fd_ < 0) throw std::system_error(errno, std::generic_category(), "epoll_create1");
  for (std::size_t i = 0; i < polled_.size(); ++i) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u32 = static_cast<std::uint32_t>(i);
    int fd = polled_[i]->get(zmq::sockopt::fd);
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0)
      throw std::system_error(errno, std::generic_category(), "epoll_ctl");
    maybe_readable_[i] = true;
  }
  records_.set_copier(&copier_);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u32 = kCopierEvent;
  if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, copier_.fd(), &ev) != 0)
    throw std::system_error(errno, std::generic_category(), "epoll_ctl");
}

void Controller::mark_sent(const zmq::socket_t& s) {
  for (std::size_t i = 0; i < kSources; ++i)
    if (polled_[i] == &s) {
      maybe_readable_[i] = true;
      return;
    }
}

void Controller::poll_once(long timeout_ms) {
  const auto& names = kSourceNames;
  bool pending = std::any_of(maybe_readable_.begin(), maybe_readable_.end(), [](bool b) { return b; });
  std::array<epoll_event, kSources + 2> evs{};
  int n = ::epoll_wait(epoll_fd_, evs.data(), static_cast<int>(evs.size()), pending ? 0 : static_cast<int>(timeout_ms));
  if (n < 0) {
    if (errno == EINTR) return;
    throw std::system_error(errno, std::generic_category(), "epoll_wait");
  }
  for (int k = 0; k < n; ++k) {
    std::uint32_t tag = evs[static_cast<std::size_t>(k)].data.u32;
    if (tag == kCopierEvent) {
      for (auto& job : copier_.take_done())
        records_.adopt_copy(job.msg_id, job.result, job.index, job.gen, std::move(job.copy));
      continue;
    }
    maybe_readable_[tag] = true;
  }
  if (n == 0 && !pending && timeout_ms > 0) maybe_readable_.fill(true);  // belt and braces, once per idle wait

  if (maybe_readable_[kMonitor]) {
    maybe_readable_[kMonitor] = false;
    on_fabric_monitor();
  }
  for (std::size_t i = 0; i < kSources; ++i) {
    if (!maybe_readable_[i]) continue;
    maybe_readable_[i] = false;  // a handler's send on this socket marks it again
    std::size_t n_read = 0;
    for (; n_read < kBatch; ++n_read) {
      Frames frames;
      frames.reserve(16);  // a task is ~9 frames plus buffers: no growth on the hot path
      std::optional<std::size_t> got;
      try {
        got = zmq::recv_multipart(*polled_[i], std::back_inserter(frames), zmq::recv_flags::dontwait);
      } catch (const zmq::error_t& e) {
        if (e.num() == EINTR) {
          maybe_readable_[i] = true;
          break;
        }
        throw;
      }
      if (!got) break;
      ++received_[i];
      // Each handler is an edge: whatever it throws becomes a logged, counted error, and the
      // loop goes on serving the next message.
      try {
        switch (i) {
          case 0: on_query(std::move(frames)); break;
          case 1: on_client_direct(std::move(frames), false); break;
          case 2: on_engine_direct(std::move(frames), false); break;
          case 3: on_client_direct(std::move(frames), true); break;
          case 4: on_engine_direct(std::move(frames), true); break;
          case 5: on_task_submit(std::move(frames)); break;
          case 6: on_task_reply(std::move(frames)); break;
          case 7: on_broadcast_submit(std::move(frames)); break;
          case 8: on_broadcast_reply(std::move(frames)); break;
          case 9: on_iopub(std::move(frames)); break;
          case 10: on_pong(std::move(frames)); break;
          case 11: on_fabric(std::move(frames)); break;
        }
      } catch (const std::exception& e) {
        ++counters_["handler_error"];
        PXF_LOG(error, kLog) << "error handling a message on " << names[i] << ": " << e.what();
      }
    }
    if (n_read == kBatch) maybe_readable_[i] = true;  // more may wait: fairness, not EAGAIN
  }
}

bool Controller::decode(const char* channel, Frames&& frames, Message& out, wire::DecodeOptions opts,
                        wire::Decoded* refused) {
  auto d = session_->decode(std::move(frames), opts);
  if (!d) {
    if (refused) {
      refused->reason = d.reason;
      refused->detail = d.detail;
    }
    auto& n = counters_[std::string("drop.") + channel + "." + wire::to_string(d.reason)];
    ++n;
    if (n <= 10 || n % 1000 == 0)
      PXF_LOG(warning, kLog) << "dropped a message on " << channel << " (" << wire::to_string(d.reason)
                             << ", #" << n << "): " << d.detail;
    return false;
  }
  out = std::move(*d.msg);
  return true;
}

void Controller::send(zmq::socket_t& s, Frames&& frames, const char* channel) {
  mark_sent(s);
  try {
    zmq::send_multipart(s, frames);
  } catch (const zmq::error_t& e) {
    if (e.num() != EHOSTUNREACH) throw;
    auto& n = counters_[std::string("unroutable.") + channel];
    ++n;
    if (n <= 10 || n % 1000 == 0)
      PXF_LOG(info, kLog) << "peer gone on " << channel << ", message dropped (#" << n << ")";
  }
}

void Controller::on_timers() {
  std::int64_t now = mono_ms();
  drain_query_monitor();
  if (now >= next_beat_ms_) {
    beat();
    next_beat_ms_ = now + opts_.ping_ms;
  }
  // Pending registrations: purge stalled ones; ping fast so new engines register quickly.
  if (engines_.pending_count() == 0) {
    next_fast_ping_ms_ = 0;
  } else {
    std::vector<int> stalled;
    for (auto& [id, e] : engines_.all())
      if (!e.registered && now >= e.pending_deadline_ms) stalled.push_back(id);
    for (int id : stalled) {
      PXF_LOG(warning, kLog) << "registration of engine " << id << " stalled (no heartbeat); dropped";
      engines_.remove(id);
    }
    if (engines_.pending_count() == 0) {
      next_fast_ping_ms_ = 0;
    } else if (now >= next_fast_ping_ms_) {
      std::string payload = std::to_string(++beat_seq_);
      hb_ping_.send(zmq::buffer(payload), zmq::send_flags::dontwait);
      next_fast_ping_ms_ = now + 25;
    }
  }
  if (fabric_probe_at_ms_ && now >= fabric_probe_at_ms_) {
    fabric_probe_at_ms_ = 0;
    probe_jobs();
  }
  // Load-balanced task timeouts apply only while a task waits for an engine (stock semantics).
  on_task_timeouts(now);
  maybe_trim(now);
}

// ------------------------------------------------------------------ fabric liveness

// A connection to the fabric ROUTER closed. Which job it was is not in the event, and a live
// gateway reconnects on its own (ZeroMQ retries every 100 ms): so after one ping period every
// job is probed, and a job the ROUTER cannot route to any more is lost.
void Controller::on_fabric_monitor() {
  for (;;) {
    Frames ev;
    auto got = zmq::recv_multipart(fabric_monitor_, std::back_inserter(ev), zmq::recv_flags::dontwait);
    if (!got) break;
    if (ev.empty() || ev[0].size() < 6) continue;
    std::uint16_t event = 0;
    std::memcpy(&event, ev[0].data(), sizeof event);
    if (event != ZMQ_EVENT_DISCONNECTED) {
      count_handshake_failure("fabric", event);
      continue;
    }
    if (jobs_.empty()) continue;
    ++counters_["fabric.disconnects"];
    if (!fabric_probe_at_ms_) fabric_probe_at_ms_ = mono_ms() + std::max(250, opts_.ping_ms);
  }
}

void Controller::drain_query_monitor() {
  if (!query_monitor_) return;
  for (;;) {
    Frames ev;
    if (!zmq::recv_multipart(query_monitor_, std::back_inserter(ev), zmq::recv_flags::dontwait)) break;
    if (ev.empty() || ev[0].size() < 6) continue;
    std::uint16_t event = 0;
    std::memcpy(&event, ev[0].data(), sizeof event);
    count_handshake_failure("registration", event);
  }
}

void Controller::count_handshake_failure(const char* where, std::uint16_t event) {
  std::int64_t n = ++counters_["curve.handshake_failed"];
  // Logged for the first few and then every 100th: a scanner must not flood the log.
  if (n <= 5 || n % 100 == 0)
    PXF_LOG(warning, kLog) << "refused a peer on the " << where << " port: CurveZMQ handshake failed ("
                           << (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL ? "not CurveZMQ, or a wrong curve_serverkey"
                               : event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH   ? "authentication"
                                                                            : "no detail")
                           << "; #" << n << "): the peer needs the curve_serverkey of this controller's connection files";
}

bool Controller::probe_job(const std::string& uuid) {
  Frames ids;
  ids.push_back(wire::frame(uuid));
  ids.push_back(wire::frame("link"));
  mark_sent(fabric_);
  try {
    zmq::send_multipart(fabric_, session_->build(std::move(ids), "pxf_probe", json::object(), json::object()));
  } catch (const zmq::error_t& e) {
    if (e.num() != EHOSTUNREACH) throw;
    return false;
  }
  return true;
}

void Controller::probe_jobs() {
  std::vector<std::string> gone;
  for (auto& [uuid, job] : jobs_)
    if (!probe_job(uuid)) gone.push_back(uuid);
  for (auto& j : gone) drop_job(j, "its gateway's connection closed and did not come back");
}

// ------------------------------------------------------------------ heartbeat

void Controller::beat() {
  std::vector<int> dead;
  for (auto& [id, e] : engines_.all()) {
    if (!e.registered || !e.job.empty()) continue;  // jobs have one heartbeat on the fabric link
    if (e.answered) {
      e.missed_beats = 0;
    } else if (++e.missed_beats > opts_.max_heartbeat_misses) {
      dead.push_back(id);
    }
    e.answered = false;
  }
  for (int id : dead) unregister(id, "missed " + std::to_string(opts_.max_heartbeat_misses + 1) + " heartbeats");
  std::int64_t now = mono_ms();
  std::vector<std::string> silent;
  for (auto& [uuid, job] : jobs_)
    if (now - job.last_heard_ms > static_cast<std::int64_t>(opts_.max_heartbeat_misses + 1) * opts_.ping_ms)
      silent.push_back(uuid);
  for (auto& j : silent) drop_job(j, "fabric link silent for " + std::to_string(opts_.max_heartbeat_misses + 1) + " heartbeat periods");
  oldest_valid_beat_ = beat_seq_;  // a pong to the previous ping still counts (late by one)
  std::string payload = std::to_string(++beat_seq_);
  hb_ping_.send(zmq::buffer(payload), zmq::send_flags::dontwait);
}

void Controller::on_pong(Frames&& frames) {
  if (frames.size() != 2) {
    ++counters_["drop.hb.malformed"];
    return;
  }
  auto payload = view(frames[1]);
  std::int64_t seq = 0;
  auto [p, ec] = std::from_chars(payload.data(), payload.data() + payload.size(), seq);
  if (ec != std::errc() || seq < oldest_valid_beat_ || seq > beat_seq_) {
    ++counters_["drop.hb.stale"];
    return;
  }
  Engine* e = engines_.by_uuid(view(frames[0]));
  if (!e) {
    ++counters_["drop.hb.unknown"];
    return;
  }
  e->answered = true;
  e->missed_beats = 0;
  if (!e->registered) finish_registration(*e);
}

} // namespace pxf::controller
