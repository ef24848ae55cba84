#pragma once
// Minimal leveled logging to stderr. Levels are Python logging's numbers, so
// `--log-level=10` means the same here as for ipcontroller.
#include <sstream>
#include <string>
#include <string_view>

namespace pxf::log {

enum Level : int { debug = 10, info = 20, warning = 30, error = 40, critical = 50 };

void set_level(int level);
int level();
void set_name(std::string name);  // program name shown in every line
// Parses "10", "DEBUG", "info", ...; returns false on anything else.
bool parse_level(std::string_view text, int& out);

void write(int level, std::string_view component, const std::string& text);

inline bool enabled(int lvl) { return lvl >= level(); }

}  // namespace pxf::log

// Stream-style logging that costs nothing when the level is off:
//   PXF_LOG(info, "hub") << "engine " << id << " registered";
#define PXF_LOG(LVL, COMPONENT)                                                                                        \
  for (bool pxf_once_ = ::pxf::log::enabled(::pxf::log::LVL); pxf_once_; pxf_once_ = false)                            \
  ::pxf::log::detail::Line(::pxf::log::LVL, COMPONENT).stream()

namespace pxf::log::detail {
class Line {
 public:
  Line(int level, std::string_view component) : level_(level), component_(component) {}
  ~Line() { write(level_, component_, os_.str()); }
  std::ostringstream& stream() { return os_; }

 private:
  int level_;
  std::string_view component_;
  std::ostringstream os_;
};
}  // namespace pxf::log::detail
