#pragma once
// When the controller gives freed heap back to the system (util/memory.hpp keeps it while busy).
#include "controller/event_loop.hpp"

#include <cstdint>

namespace pxf::controller {

class HeapTrim {
 public:
  explicit HeapTrim(Counters& counters) : counters_(counters) {}

  // Once a second, off the message path: after a quiet second (nothing received, no task
  // waiting or in flight) that follows activity, hand freed heap back to the system when a
  // burst of tasks or of data left some. `work_received`: messages read so far (heartbeats
  // excepted); `tasks_finished`: tasks answered so far.
  void maybe_trim(std::int64_t now, std::uint64_t work_received, bool scheduler_idle, std::uint64_t tasks_finished);
  std::int64_t next_look_ms() const { return trim_at_ms_; }

 private:
  Counters& counters_;
  std::int64_t trim_at_ms_ = 0;         // next once-a-second look
  std::uint64_t rx_at_trim_check_ = 0;  // work_received at the last look
  std::uint64_t tasks_at_trim_ = 0;     // tasks_finished at the last trim
  bool active_since_trim_ = false;      // messages arrived since the last trim
};

}  // namespace pxf::controller
