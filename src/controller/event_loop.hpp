#pragma once
// The controller's event loop: one epoll set over the sockets' ZMQ_FDs, decoding with the
// drop counters, and every send on a polled socket (protocol §3: one process, one thread).
//
// Why epoll and not zmq_poll: zmq_poll over 13 sockets costs two syscalls per socket per call.
// A ZMQ_FD only signals new *commands*: a socket may hold messages without signalling once
// anything (a send, a recv) has processed its commands. So a socket stays "maybe readable"
// until a recv on it returned EAGAIN, and every send on a polled socket marks it again
// (mark_sent): a send can consume the ZMQ_FD edge of pending input, and a socket that is not
// re-checked then stalls until the next timer. Hence: send on a polled socket only through
// send() (or call mark_sent yourself).
//
// The components (hub, schedulers, relays, job link, heart) decode, send and count through
// one EventLoop; the Controller dispatches what poll_once reads (a template argument: no
// virtual call or std::function per message).
#include "wire/session.hpp"

#include <zmq.hpp>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>

namespace pxf::controller {

using wire::Frames;
using wire::json;
using wire::Message;

// Drops, errors and fabric traffic by kind (pxf_stats_request reports them).
using Counters = std::unordered_map<std::string, std::uint64_t>;

class EventLoop {
 public:
  // The sockets poll_once reads, in the order they are served.
  enum Source : std::size_t {
    kQuery,
    kMuxIn,
    kMuxOut,
    kControlIn,
    kControlOut,
    kTaskIn,
    kTaskOut,
    kBcastIn,
    kBcastOut,
    kIopubOut,  // the clients' iopub XPUB: served first, so a new subscription applies before output
    kIopub,
    kPong,
    kFabric,
    kNotification,  // the notification XPUB: clients' subscriptions
    kSources
  };
  static const std::array<const char*, kSources> kSourceNames;  // "query", ..., "fabric", "notification"

  EventLoop() = default;
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // The session every component decodes and signs with (created by Controller::start).
  void set_session(wire::Session* session) { session_ = session; }
  wire::Session& session() { return *session_; }

  // Builds the epoll set: `sockets` in Source order, the fabric ROUTER's monitor (read first)
  // and a plain fd (the buffer copier's eventfd).
  void watch(const std::array<zmq::socket_t*, kSources>& sockets, zmq::socket_t& monitor, int side_fd);

  // Waits up to `timeout_ms` (not at all while a socket may be readable) and serves what
  // arrived. `h` provides on_side_fd(), on_monitor() and on_message(Source, Frames&&).
  template <class Handler>
  void poll_once(long timeout_ms, Handler& h);

  // Decodes and verifies; a refused message is logged (rate-limited) and counted.
  // `refused` (optional) receives the reason and detail of a refusal.
  bool decode(const char* channel, Frames&& frames, Message& out, wire::DecodeOptions opts,
              wire::Decoded* refused = nullptr);
  // Sends on `s`, marking it maybe-readable; a peer gone (EHOSTUNREACH) is counted, not thrown.
  void send(zmq::socket_t& s, Frames&& frames, const char* channel);
  // For a send that does not go through send() (e.g. one whose EHOSTUNREACH the caller wants).
  void mark_sent(const zmq::socket_t& s);

  Counters& counters() { return counters_; }
  // --curve: a failed CurveZMQ handshake seen by a socket monitor, counted and logged.
  void count_handshake_failure(const char* where, std::uint16_t event);

  std::uint64_t received(std::size_t source) const { return received_[source]; }
  // Messages read on every socket but the heartbeat's (which is never quiet while engines live).
  std::uint64_t work_received() const {
    std::uint64_t n = 0;
    for (std::size_t i = 0; i < kSources; ++i)
      if (i != kPong) n += received_[i];
    return n;
  }

 private:
  static constexpr std::size_t kMonitor = kSources;  // index of the fabric monitor
  static constexpr std::uint32_t kSideEvent = 1000;  // epoll tag of the side fd
  static constexpr std::size_t kBatch = 256;         // messages drained per socket per poll, for fairness

  // epoll_wait; marks what signalled. Returns false if interrupted (EINTR).
  bool wait(long timeout_ms, bool& side_ready);
  void log_handler_error(std::size_t source, const std::exception& e);

  wire::Session* session_ = nullptr;
  Counters counters_;
  std::array<std::uint64_t, kSources> received_{};  // messages read per socket
  std::array<zmq::socket_t*, kSources + 1> polled_{};
  std::array<bool, kSources + 1> maybe_readable_{};
  int epoll_fd_ = -1;
};

template <class Handler>
void EventLoop::poll_once(long timeout_ms, Handler& h) {
  bool side_ready = false;
  if (!wait(timeout_ms, side_ready)) return;
  if (side_ready) h.on_side_fd();
  if (maybe_readable_[kMonitor]) {
    maybe_readable_[kMonitor] = false;
    h.on_monitor();
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
        h.on_message(static_cast<Source>(i), std::move(frames));
      } catch (const std::exception& e) {
        log_handler_error(i, e);
      }
    }
    if (n_read == kBatch) maybe_readable_[i] = true;  // more may wait: fairness, not EAGAIN
  }
}

}  // namespace pxf::controller
