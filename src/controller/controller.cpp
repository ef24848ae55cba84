#include "controller/controller.hpp"

#include "controller/errors.hpp"
#include "util/clock.hpp"
#include "util/ids.hpp"
#include "util/log.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace pxf::controller {

using wire::view;

namespace {
constexpr const char* kLog = "controller";

std::string hostname() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "localhost";
  return buf;
}
}  // namespace

Controller::Controller(Options opts)
    : opts_(std::move(opts)),
      records_(RecordLimits{opts_.record_limit, opts_.size_limit, opts_.cull_fraction, opts_.keep_records}),
      link_(loop_, engines_, opts_, fabric_, fabric_monitor_, mux_out_, control_out_, task_out_),
      tasks_(loop_, engines_, records_, link_, task_in_, opts_.scheme, opts_.hwm),
      relays_(loop_, engines_, records_, link_, hub_, mux_in_, control_in_, iopub_out_),
      broadcasts_(loop_, engines_, relays_, bcast_in_, bcast_out_, fabric_),
      heart_(loop_, engines_, hub_, link_, opts_, hb_ping_),
      hub_(loop_, engines_, records_, tasks_, broadcasts_, link_, heart_, copier_, opts_, engine_info_, query_,
           notifier_),
      trim_(loop_.counters()) {
  link_.attach(hub_, tasks_, broadcasts_, relays_);
  location_ = conn::resolve_profile(opts_.profile);
  port_pool_ = opts_.ports;
  if (opts_.location.empty()) opts_.location = hostname();
  if (opts_.engine_ip.empty()) opts_.engine_ip = opts_.ip;
  if (opts_.client_ip.empty()) opts_.client_ip = opts_.ip;
  if (opts_.registration_timeout_s <= 0) opts_.registration_timeout_s = std::max(30.0, opts_.ping_ms / 100.0);
}

Controller::~Controller() { remove_connection_files(); }

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
  loop_.set_session(session_.get());

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
    port_pool_ = {old_client->registration, old_client->mux,  old_engine->mux,  old_client->control,
                  old_engine->control,      old_client->task, old_engine->task, old_client->broadcast};
    for (int p : old_engine->broadcast) port_pool_.push_back(p);
    for (int p :
         {old_engine->iopub, old_client->iopub, old_client->notification, old_engine->hb_ping, old_engine->hb_pong})
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
  // An XPUB read by the event loop: a client's new subscription is applied as soon as it arrives
  // (served before iopub_in_ in each round), not at a later send (libzmq applies a PUB's
  // subscriptions only when a send happens more than ~1 ms after the last one: the first output
  // of a client's first request could be dropped for it).
  iopub_out_ = zmq::socket_t(ctx_, zmq::socket_type::xpub);
  int iopub_c = bind(iopub_out_, opts_.client_ip);
  // An XPUB that hears every client's subscription (verbose: not only the first to a topic),
  // so the hub can repeat registrations a client subscribed too late for (Hub::on_subscription).
  notifier_ = zmq::socket_t(ctx_, zmq::socket_type::xpub);
  notifier_.set(zmq::sockopt::xpub_verbose, 1);
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
  if (zmq_socket_monitor(fabric_.handle(), monitor_ep.c_str(),
                         ZMQ_EVENT_DISCONNECTED | (opts_.curve ? kHandshakeFailed : 0)) != 0)
    throw zmq::error_t();
  if (opts_.curve) {
    const std::string query_ep = "inproc://pxf-query-monitor";
    if (zmq_socket_monitor(query_.handle(), query_ep.c_str(), kHandshakeFailed) != 0) throw zmq::error_t();
    query_monitor_ = zmq::socket_t(ctx_, zmq::socket_type::pair);
    query_monitor_.connect(query_ep);
  }
  fabric_monitor_ = zmq::socket_t(ctx_, zmq::socket_type::pair);
  fabric_monitor_.connect(monitor_ep);
  records_.set_copier(&copier_);
  loop_.watch({&query_, &mux_in_, &mux_out_, &control_in_, &control_out_, &task_in_, &task_out_, &bcast_in_,
               &bcast_out_, &iopub_out_, &iopub_in_, &hb_pong_, &fabric_, &notifier_},
              fabric_monitor_, copier_.fd());

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
    PXF_LOG(warning, kLog) << "listening on a network ("
                           << (loopback(opts_.client_ip) ? opts_.engine_ip : opts_.client_ip)
                           << ") without encryption: messages are signed, not encrypted; add --curve "
                              "(IPController.enable_curve=True or IPP_ENABLE_CURVE=1) to encrypt them";
  if (opts_.keep_records)
    PXF_LOG(info, kLog) << "task records: in memory (DictDB), up to " << opts_.record_limit << " records and "
                        << opts_.size_limit << " buffer bytes";
  else PXF_LOG(info, kLog) << "task records: none kept (NoDB)";
  heart_.start(mono_ms());
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

// What the event loop reads, to the component that serves it (inlined into poll_once).
struct Controller::Dispatch {
  Controller& c;
  void on_side_fd() {
    for (auto& job : c.copier_.take_done())
      c.records_.adopt_copy(job.msg_id, job.result, job.index, job.gen, std::move(job.copy));
  }
  void on_monitor() { c.link_.on_monitor(); }
  void on_message(EventLoop::Source source, Frames&& frames) {
    switch (source) {
    case EventLoop::kQuery: c.hub_.on_query(std::move(frames)); break;
    case EventLoop::kMuxIn: c.relays_.on_client_direct(std::move(frames), false); break;
    case EventLoop::kMuxOut: c.relays_.on_engine_direct(std::move(frames), false); break;
    case EventLoop::kControlIn: c.relays_.on_client_direct(std::move(frames), true); break;
    case EventLoop::kControlOut: c.relays_.on_engine_direct(std::move(frames), true); break;
    case EventLoop::kTaskIn: c.tasks_.on_task_submit(std::move(frames)); break;
    case EventLoop::kTaskOut: c.tasks_.on_task_reply(std::move(frames)); break;
    case EventLoop::kBcastIn: c.broadcasts_.on_broadcast_submit(std::move(frames)); break;
    case EventLoop::kBcastOut: c.broadcasts_.on_broadcast_reply(std::move(frames)); break;
    case EventLoop::kIopubOut: break;  // a subscription: reading it applied it
    case EventLoop::kIopub: c.relays_.on_iopub(std::move(frames)); break;
    case EventLoop::kPong: c.heart_.on_pong(std::move(frames)); break;
    case EventLoop::kFabric: c.link_.on_fabric(std::move(frames)); break;
    case EventLoop::kNotification: c.hub_.on_subscription(std::move(frames)); break;
    case EventLoop::kSources: break;
    }
  }
};

int Controller::run() {
  Dispatch dispatch{*this};
  while (!stop_requested_) {
    std::int64_t now = mono_ms();
    std::int64_t next = heart_.next_deadline();
    if (std::int64_t at = hub_.shutdown_at_ms()) next = std::min(next, at);
    if (std::int64_t at = hub_.next_replay_ms()) next = std::min(next, at);
    if (std::int64_t at = link_.next_probe_ms()) next = std::min(next, at);
    if (auto at = tasks_.next_timeout()) next = std::min(next, *at);
    if (std::int64_t at = trim_.next_look_ms()) next = std::min(next, at);
    loop_.poll_once(std::clamp<std::int64_t>(next - now, 0, 1000), dispatch);
    on_timers();
    if (hub_.shutdown_at_ms() && mono_ms() >= hub_.shutdown_at_ms()) break;
  }
  PXF_LOG(info, kLog) << "stopping; dropped messages: " << session_->drops().summary();
  // Clients see the engines go (unregistration notifications) and their outstanding work fail
  // with EngineError, instead of waiting forever on a controller that is gone (stock's
  // ipcontroller just exits). A batch job's end stops its controller this way.
  hub_.unregister_all("the controller is exiting");
  // MPI jobs end with the controller (stock engines would wait out their heartbeat misses);
  // all of it delivered within the sockets' 1 s linger.
  link_.shutdown_jobs("the controller is exiting");
  remove_connection_files();
  return 0;
}

void Controller::on_timers() {
  std::int64_t now = mono_ms();
  drain_query_monitor();
  heart_.on_timers(now);
  hub_.on_timers(now);
  link_.on_timers(now);
  tasks_.on_timeouts(now);
  trim_.maybe_trim(now, loop_.work_received(), tasks_.idle(), tasks_.tasks_finished());
}

void Controller::drain_query_monitor() {
  if (!query_monitor_) return;
  for (;;) {
    Frames ev;
    if (!zmq::recv_multipart(query_monitor_, std::back_inserter(ev), zmq::recv_flags::dontwait)) break;
    if (ev.empty() || ev[0].size() < 6) continue;
    std::uint16_t event = 0;
    std::memcpy(&event, ev[0].data(), sizeof event);
    loop_.count_handshake_failure("registration", event);
  }
}

}  // namespace pxf::controller
