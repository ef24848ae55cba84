#include "controller/event_loop.hpp"

#include "util/log.hpp"

#include <sys/epoll.h>
#include <unistd.h>

#include <algorithm>
#include <system_error>

namespace pxf::controller {

namespace {
constexpr const char* kLog = "controller";
}  // namespace

const std::array<const char*, EventLoop::kSources> EventLoop::kSourceNames = {
    "query",    "mux_in",    "mux_out",   "control_in", "control_out", "task_in", "task_out",
    "bcast_in", "bcast_out", "iopub_out", "iopub",      "hb",          "fabric",  "notification"};

EventLoop::~EventLoop() {
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
}

void EventLoop::watch(const std::array<zmq::socket_t*, kSources>& sockets, zmq::socket_t& monitor, int side_fd) {
  std::copy(sockets.begin(), sockets.end(), polled_.begin());
  polled_[kMonitor] = &monitor;
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
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u32 = kSideEvent;
  if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, side_fd, &ev) != 0)
    throw std::system_error(errno, std::generic_category(), "epoll_ctl");
}

void EventLoop::mark_sent(const zmq::socket_t& s) {
  for (std::size_t i = 0; i < kSources; ++i)
    if (polled_[i] == &s) {
      maybe_readable_[i] = true;
      return;
    }
}

bool EventLoop::wait(long timeout_ms, bool& side_ready) {
  bool pending = std::any_of(maybe_readable_.begin(), maybe_readable_.end(), [](bool b) { return b; });
  std::array<epoll_event, kSources + 2> evs{};
  int n = ::epoll_wait(epoll_fd_, evs.data(), static_cast<int>(evs.size()), pending ? 0 : static_cast<int>(timeout_ms));
  if (n < 0) {
    if (errno == EINTR) return false;
    throw std::system_error(errno, std::generic_category(), "epoll_wait");
  }
  for (int k = 0; k < n; ++k) {
    std::uint32_t tag = evs[static_cast<std::size_t>(k)].data.u32;
    if (tag == kSideEvent) {
      side_ready = true;
      continue;
    }
    maybe_readable_[tag] = true;
  }
  if (n == 0 && !pending && timeout_ms > 0) maybe_readable_.fill(true);  // belt and braces, once per idle wait
  return true;
}

void EventLoop::log_handler_error(std::size_t source, const std::exception& e) {
  ++counters_["handler_error"];
  PXF_LOG(error, kLog) << "error handling a message on " << kSourceNames[source] << ": " << e.what();
}

bool EventLoop::decode(const char* channel, Frames&& frames, Message& out, wire::DecodeOptions opts,
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
      PXF_LOG(warning, kLog) << "dropped a message on " << channel << " (" << wire::to_string(d.reason) << ", #" << n
                             << "): " << d.detail;
    return false;
  }
  out = std::move(*d.msg);
  return true;
}

void EventLoop::send(zmq::socket_t& s, Frames&& frames, const char* channel) {
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

void EventLoop::count_handshake_failure(const char* where, std::uint16_t event) {
  std::int64_t n = ++counters_["curve.handshake_failed"];
  // Logged for the first few and then every 100th: a scanner must not flood the log.
  if (n <= 5 || n % 100 == 0)
    PXF_LOG(warning, kLog) << "refused a peer on the " << where << " port: CurveZMQ handshake failed ("
                           << (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL ? "not CurveZMQ, or a wrong curve_serverkey"
                               : event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH   ? "authentication"
                                                                            : "no detail")
                           << "; #" << n
                           << "): the peer needs the curve_serverkey of this controller's connection files";
}

}  // namespace pxf::controller
