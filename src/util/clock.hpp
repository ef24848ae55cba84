#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace pxf {

// ISO-8601 UTC with microseconds and 'Z', as jupyter_client writes header dates:
// "2026-11-21T15:50:56.826501Z".
std::string iso_now();
std::string iso_format(std::chrono::system_clock::time_point t);

// Monotonic milliseconds, for timers.
inline std::int64_t mono_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
}

}  // namespace pxf
