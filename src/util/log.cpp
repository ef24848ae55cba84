#include "util/log.hpp"

#include "util/clock.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <mutex>

namespace pxf::log {
namespace {
std::atomic<int> g_level{info};
std::string g_name = "pxfabric";
std::mutex g_mutex;

const char* level_name(int lvl) {
  if (lvl >= critical) return "CRITICAL";
  if (lvl >= error) return "ERROR";
  if (lvl >= warning) return "WARNING";
  if (lvl >= info) return "INFO";
  return "DEBUG";
}
}  // namespace

void set_level(int lvl) { g_level = lvl; }
int level() { return g_level; }
void set_name(std::string name) {
  std::lock_guard lock(g_mutex);  // write() reads g_name under the same lock
  g_name = std::move(name);
}

bool parse_level(std::string_view text, int& out) {
  int v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec == std::errc() && p == text.data() + text.size()) {
    out = v;
    return true;
  }
  std::string up(text);
  std::transform(up.begin(), up.end(), up.begin(), [](unsigned char c) { return std::toupper(c); });
  static const std::pair<const char*, int> names[] = {{"DEBUG", debug},     {"INFO", info},   {"WARN", warning},
                                                      {"WARNING", warning}, {"ERROR", error}, {"CRITICAL", critical}};
  for (auto& [n, l] : names)
    if (up == n) {
      out = l;
      return true;
    }
  return false;
}

void write(int lvl, std::string_view component, const std::string& text) {
  std::string ts = iso_now();
  std::lock_guard lock(g_mutex);
  std::fprintf(stderr, "%.23s [%s %d] %s %.*s: %s\n", ts.c_str(), g_name.c_str(), static_cast<int>(getpid()),
               level_name(lvl), static_cast<int>(component.size()), component.data(), text.c_str());
  std::fflush(stderr);
}

}  // namespace pxf::log
