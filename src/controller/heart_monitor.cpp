// The heartbeat (heart_monitor.hpp).
#include "controller/heart_monitor.hpp"

#include "controller/hub.hpp"
#include "controller/job_link.hpp"
#include "util/clock.hpp"
#include "util/log.hpp"

#include <charconv>

namespace pxf::controller {

using wire::view;

namespace {
constexpr const char* kLog = "controller";
}  // namespace

HeartMonitor::HeartMonitor(EventLoop& loop, EngineTable& engines, Hub& hub, JobLink& link, const Options& opts,
                           zmq::socket_t& hb_ping)
    : counters_(loop.counters()),
      engines_(engines),
      hub_(hub),
      link_(link),
      opts_(opts),
      hb_ping_(hb_ping) {}

void HeartMonitor::on_timers(std::int64_t now) {
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
}

void HeartMonitor::beat() {
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
  for (int id : dead) hub_.unregister(id, "missed " + std::to_string(opts_.max_heartbeat_misses + 1) + " heartbeats");
  std::int64_t now = mono_ms();
  auto limit = static_cast<std::int64_t>(opts_.max_heartbeat_misses + 1) * opts_.ping_ms;
  for (auto& j : link_.silent_jobs(now, limit))
    link_.drop_job(j,
                   "fabric link silent for " + std::to_string(opts_.max_heartbeat_misses + 1) + " heartbeat periods");
  oldest_valid_beat_ = beat_seq_;  // a pong to the previous ping still counts (late by one)
  std::string payload = std::to_string(++beat_seq_);
  hb_ping_.send(zmq::buffer(payload), zmq::send_flags::dontwait);
}

void HeartMonitor::on_pong(Frames&& frames) {
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
  if (!e->registered) hub_.finish_registration(*e);
}

}  // namespace pxf::controller
