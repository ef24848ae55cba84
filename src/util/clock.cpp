#include "util/clock.hpp"

#include <cstdio>
#include <ctime>

namespace pxf {

std::string iso_format(std::chrono::system_clock::time_point t) {
  using namespace std::chrono;
  auto us = duration_cast<microseconds>(t.time_since_epoch()).count();
  std::time_t secs = static_cast<std::time_t>(us / 1000000);
  long frac = static_cast<long>(us % 1000000);
  if (frac < 0) {
    frac += 1000000;
    --secs;
  }
  // The seconds part changes once a second: format it then, and only the digits after.
  thread_local std::time_t last_secs = 0;
  thread_local std::string prefix;  // "YYYY-MM-DDTHH:MM:SS." of last_secs; empty until the first call
  if (prefix.empty() || secs != last_secs) {
    std::tm tm{};
    gmtime_r(&secs, &tm);
    char buf[128];  // room for any int fields, so the format can never truncate
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                  tm.tm_hour, tm.tm_min, tm.tm_sec);
    prefix = buf;
    last_secs = secs;
  }
  std::string out;
  out.reserve(prefix.size() + 7);
  out += prefix;
  char digits[7];
  for (int i = 5; i >= 0; --i) {
    digits[i] = static_cast<char>('0' + frac % 10);
    frac /= 10;
  }
  digits[6] = 'Z';
  out.append(digits, 7);
  return out;
}

std::string iso_now() { return iso_format(std::chrono::system_clock::now()); }

}  // namespace pxf
