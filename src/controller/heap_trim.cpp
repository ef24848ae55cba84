#include "controller/heap_trim.hpp"

#include "util/memory.hpp"

namespace pxf::controller {

void HeapTrim::maybe_trim(std::int64_t now, std::uint64_t work_received, bool scheduler_idle,
                          std::uint64_t tasks_finished) {
  if (now < trim_at_ms_) return;
  trim_at_ms_ = now + 1000;
  if (work_received != rx_at_trim_check_) {  // not quiet
    rx_at_trim_check_ = work_received;
    active_since_trim_ = true;
    return;
  }
  if (!active_since_trim_ || !scheduler_idle) return;
  active_since_trim_ = false;
  // glibc keeps freed memory otherwise, by our choice while busy: trim after a burst of tasks
  // or when util/memory finds enough free at the top of the heap.
  if (tasks_finished - tasks_at_trim_ < 4096 && !memory::worth_trimming()) return;
  tasks_at_trim_ = tasks_finished;
  memory::trim_heap();
  ++counters_["malloc_trim"];
}

}  // namespace pxf::controller
