// util: ids, ISO dates and log levels in the formats jupyter_client and Python logging use.
#include "util/clock.hpp"
#include "util/ids.hpp"
#include "util/log.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <regex>
#include <set>
#include <string>

namespace {

using namespace std::chrono;

TEST(Ids, NewIdIs8HexDash24Hex) {
  static const std::regex re("^[0-9a-f]{8}-[0-9a-f]{24}$");
  for (int i = 0; i < 100; ++i) {
    std::string id = pxf::new_id();
    EXPECT_TRUE(std::regex_match(id, re)) << id;
  }
}

TEST(Ids, NewIdsAreUnique) {
  std::set<std::string> ids;
  for (int i = 0; i < 10000; ++i) ids.insert(pxf::new_id());
  EXPECT_EQ(ids.size(), 10000u);
}

TEST(Ids, RandomHexHasTwoLowercaseDigitsPerByte) {
  static const std::regex re("^[0-9a-f]*$");
  EXPECT_EQ(pxf::random_hex(0), "");
  std::string h = pxf::random_hex(32);
  EXPECT_EQ(h.size(), 64u);
  EXPECT_TRUE(std::regex_match(h, re)) << h;
  EXPECT_NE(pxf::random_hex(16), pxf::random_hex(16));
}

system_clock::time_point at(sys_days day, hours h, minutes m, seconds s, microseconds us) {
  return system_clock::time_point(duration_cast<system_clock::duration>(day.time_since_epoch() + h + m + s + us));
}

TEST(Clock, IsoFormatHasMicrosecondsAndZ) {
  EXPECT_EQ(pxf::iso_format(system_clock::time_point{}), "1970-01-01T00:00:00.000000Z");
  EXPECT_EQ(pxf::iso_format(at(2026y / 11 / 21, 15h, 50min, 56s, 826501us)), "2026-11-21T15:50:56.826501Z");
  EXPECT_EQ(pxf::iso_format(at(2024y / 2 / 29, 0h, 0min, 0s, 7us)), "2024-02-29T00:00:00.000007Z");
  EXPECT_EQ(pxf::iso_format(at(1999y / 12 / 31, 23h, 59min, 59s, 999999us)), "1999-12-31T23:59:59.999999Z");
}

TEST(Clock, IsoFormatBeforeEpochBorrowsASecond) {
  // Negative microsecond counts: the fraction must stay in [0, 1e6) and the second step back.
  EXPECT_EQ(pxf::iso_format(system_clock::time_point{} - microseconds(1)), "1969-12-31T23:59:59.999999Z");
  EXPECT_EQ(pxf::iso_format(system_clock::time_point{} - microseconds(1500000)), "1969-12-31T23:59:58.500000Z");
}

TEST(Clock, IsoFormatAcrossSecondsWithTheCachedPrefix) {
  // The date-time prefix is reused within one second: changing seconds (either way) re-formats.
  auto t = at(2026y / 12 / 31, 23h, 59min, 59s, 999999us);
  EXPECT_EQ(pxf::iso_format(t), "2026-12-31T23:59:59.999999Z");
  EXPECT_EQ(pxf::iso_format(t + microseconds(1)), "2027-01-01T00:00:00.000000Z");
  EXPECT_EQ(pxf::iso_format(t - microseconds(999999)), "2026-12-31T23:59:59.000000Z");
  EXPECT_EQ(pxf::iso_format(t + microseconds(12)), "2027-01-01T00:00:00.000011Z");
}

TEST(Clock, IsoNowMatchesJupyterClientFormatAndIsNow) {
  static const std::regex re(R"(^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$)");
  auto before = pxf::iso_format(system_clock::now());
  auto now = pxf::iso_now();
  auto after = pxf::iso_format(system_clock::now());
  EXPECT_TRUE(std::regex_match(now, re)) << now;
  // Same fixed-width format, so lexical order is time order.
  EXPECT_LE(before, now);
  EXPECT_LE(now, after);
}

TEST(Clock, MonoMsNeverGoesBack) {
  auto a = pxf::mono_ms();
  auto b = pxf::mono_ms();
  EXPECT_LE(a, b);
}

TEST(LogLevel, ParsesPythonNumbersAndNames) {
  int lvl = -1;
  EXPECT_TRUE(pxf::log::parse_level("10", lvl));
  EXPECT_EQ(lvl, 10);
  EXPECT_TRUE(pxf::log::parse_level("35", lvl));  // any number, as Python's setLevel takes
  EXPECT_EQ(lvl, 35);
  struct Case {
    const char* text;
    int level;
  } cases[] = {{"DEBUG", 10},   {"debug", 10}, {"Info", 20},     {"INFO", 20},    {"WARN", 30},
               {"warning", 30}, {"ERROR", 40}, {"critical", 50}, {"CRITICAL", 50}};
  for (auto& c : cases) {
    lvl = -1;
    EXPECT_TRUE(pxf::log::parse_level(c.text, lvl)) << c.text;
    EXPECT_EQ(lvl, c.level) << c.text;
  }
}

TEST(LogLevel, RejectsAnythingElseAndLeavesOutputAlone) {
  for (const char* bad : {"", "verbose", "10x", " 10", "info ", "INFOO", "1 0"}) {
    int lvl = 12345;
    EXPECT_FALSE(pxf::log::parse_level(bad, lvl)) << '"' << bad << '"';
    EXPECT_EQ(lvl, 12345) << '"' << bad << '"';
  }
}

TEST(LogLevel, DisabledLinesAreNotEvaluated) {
  int old = pxf::log::level();
  pxf::log::set_level(pxf::log::error);
  int evaluated = 0;
  auto side_effect = [&] { return ++evaluated; };
  PXF_LOG(debug, "test") << side_effect();
  PXF_LOG(info, "test") << side_effect();
  EXPECT_EQ(evaluated, 0);
  EXPECT_FALSE(pxf::log::enabled(pxf::log::warning));
  EXPECT_TRUE(pxf::log::enabled(pxf::log::error));
  testing::internal::CaptureStderr();
  PXF_LOG(critical, "test") << "shown " << side_effect();
  std::string err = testing::internal::GetCapturedStderr();
  pxf::log::set_level(old);
  EXPECT_EQ(evaluated, 1);
  EXPECT_NE(err.find("CRITICAL test: shown 1"), std::string::npos) << err;
}

}  // namespace
