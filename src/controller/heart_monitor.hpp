#pragma once
// The heartbeat of stock engines (protocol §5): a ping every period on hb_ping, pongs on
// hb_pong; an engine that misses max_heartbeat_misses+1 beats is unregistered. A new engine's
// registration completes on its first pong, and while registrations are pending it pings
// fast. Fabric jobs beat on the link instead (job_link.hpp); a job silent as long is dropped.
#include "controller/engines.hpp"
#include "controller/event_loop.hpp"
#include "controller/options.hpp"

#include <algorithm>
#include <cstdint>

namespace pxf::controller {

class Hub;
class JobLink;

class HeartMonitor {
 public:
  HeartMonitor(EventLoop& loop, EngineTable& engines, Hub& hub, JobLink& link, const Options& opts,
               zmq::socket_t& hb_ping);

  // The first beat is one period from `now`.
  void start(std::int64_t now) { next_beat_ms_ = now + opts_.ping_ms; }
  // Beats when due; purges stalled registrations and pings fast while some are pending.
  void on_timers(std::int64_t now);
  // The next time on_timers has something to do.
  std::int64_t next_deadline() const {
    return next_fast_ping_ms_ ? std::min(next_beat_ms_, next_fast_ping_ms_) : next_beat_ms_;
  }
  // [E, seq] on hb_pong.
  void on_pong(Frames&& frames);
  // Ping now: a registration completes on the first pong.
  void ping_soon(std::int64_t now) { next_fast_ping_ms_ = now; }

 private:
  void beat();

  Counters& counters_;
  EngineTable& engines_;
  Hub& hub_;
  JobLink& link_;
  const Options& opts_;
  zmq::socket_t& hb_ping_;
  std::int64_t beat_seq_ = 0, oldest_valid_beat_ = 0, next_beat_ms_ = 0;
  std::int64_t next_fast_ping_ms_ = 0;
};

}  // namespace pxf::controller
