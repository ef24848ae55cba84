#pragma once
// The job's heartbeat to pxcontroller, on its own thread and its own DEALER (routing id
// "<job uuid>/hb", docs/fabric-link.md). Liveness must not depend on the fabric thread, which
// shares MPI's progress engine (and its locks) with user code: with 8 ranks on 2 busy cores a
// rank-0 fabric thread was seen starved for 3 s during allreduce loops, and the job was
// dropped. Like the stock engine's heart (a zmq device thread), this thread only echoes time.
#include "gateway/curve_client.hpp"
#include "wire/session.hpp"

#include <zmq.hpp>

#include <atomic>
#include <mutex>
#include <string>
#include <thread>

namespace pxf::gateway {

class Heart {
 public:
  // Starts beating every `period_ms`; gives up (controller_lost()) after `max_misses`
  // unanswered beats and as many periods of silence.
  Heart(zmq::context_t& ctx, const std::string& url, const std::string& job_uuid, wire::SessionOptions session,
        int period_ms, int max_misses, CurveClient curve = {});
  ~Heart();
  Heart(const Heart&) = delete;
  Heart& operator=(const Heart&) = delete;

  bool controller_lost() const { return lost_.load(); }
  std::string why() const;

 private:
  void run();

  zmq::context_t& ctx_;
  std::string url_, routing_id_;
  CurveClient curve_;
  wire::Session session_;
  int period_ms_, max_misses_;
  std::atomic<bool> stop_{false}, lost_{false};
  mutable std::mutex mu_;
  std::string why_;
  std::thread thread_;
};

}  // namespace pxf::gateway
