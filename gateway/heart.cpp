#include "gateway/heart.hpp"

#include "link/protocol.hpp"

#include "util/clock.hpp"
#include "util/log.hpp"

#include <algorithm>

namespace pxf::gateway {

namespace {
constexpr const char* kLog = "gateway";
constexpr std::int64_t kSliceMs = 50;  // stop() is noticed within this
using wire::Frames;
}  // namespace

Heart::Heart(zmq::context_t& ctx, const std::string& url, const std::string& job_uuid, wire::SessionOptions session,
             int period_ms, int max_misses, CurveClient curve)
    : ctx_(ctx),
      url_(url),
      routing_id_(job_uuid + link::kHeartSuffix),
      curve_(std::move(curve)),
      session_([&] {
        session.session_id = job_uuid;
        return session;
      }()),
      period_ms_(std::max(10, period_ms)),
      max_misses_(std::max(1, max_misses)) {
  thread_ = std::thread([this] { run(); });
}

Heart::~Heart() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

std::string Heart::why() const {
  std::lock_guard lock(mu_);
  return why_;
}

void Heart::run() {
  zmq::socket_t sock(ctx_, zmq::socket_type::dealer);
  sock.set(zmq::sockopt::routing_id, routing_id_);
  sock.set(zmq::sockopt::linger, 0);
  curve_.apply(sock);
  sock.connect(url_);
  std::uint64_t seq = 0, acked = 0;
  std::int64_t last_heard = mono_ms();
  std::int64_t next_beat = last_heard;
  while (!stop_) {
    std::int64_t now = mono_ms();
    if (now >= next_beat) {
      if (seq - acked >= static_cast<std::uint64_t>(max_misses_) &&
          now - last_heard > static_cast<std::int64_t>(max_misses_) * period_ms_) {
        std::lock_guard lock(mu_);
        why_ = std::to_string(seq - acked) + " heartbeats unanswered, nothing heard for " +
               std::to_string(now - last_heard) + " ms";
        lost_ = true;
        return;
      }
      Frames ids;
      ids.push_back(wire::frame(link::kLinkChannel));
      zmq::send_multipart(sock, session_.build(std::move(ids), link::kHeartbeat, {{"seq", ++seq}}),
                          zmq::send_flags::dontwait);
      next_beat = now + period_ms_;
    }
    zmq::pollitem_t item{sock.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, std::chrono::milliseconds(std::clamp<std::int64_t>(next_beat - now, 0, kSliceMs)));
    for (;;) {
      Frames frames;
      if (!zmq::recv_multipart(sock, std::back_inserter(frames), zmq::recv_flags::dontwait)) break;
      if (frames.empty() || wire::view(frames[0]) != link::kLinkChannel) continue;
      frames.erase(frames.begin());
      auto d = session_.decode(std::move(frames), {.check_replay = false});
      if (!d) {
        PXF_LOG(warning, kLog) << "heartbeat: dropped a reply: " << d.detail;
        continue;
      }
      if (d.msg->msg_type() != link::kHeartbeatReply) continue;
      acked = std::max(acked, wire::get_or<std::uint64_t>(d.msg->content, "seq", 0));
      last_heard = mono_ms();
    }
  }
}

}  // namespace pxf::gateway
