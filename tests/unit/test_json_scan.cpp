// scan_object: top-level string members of a JSON object, checked against nlohmann::json.
#include "wire/json_scan.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <array>
#include <random>
#include <string>

namespace {

using nlohmann::json;
using pxf::wire::scan_object;
using pxf::wire::ScanField;

struct Three {
  std::array<ScanField, 3> f{{ScanField("msg_id"), ScanField("msg_type"), ScanField("session")}};
  bool scan(std::string_view text) { return scan_object(text, f); }
  const std::optional<std::string>& id() const { return f[0].value; }
  const std::optional<std::string>& type() const { return f[1].value; }
  const std::optional<std::string>& session() const { return f[2].value; }
};

TEST(JsonScan, ReadsAStockHeader) {
  Three t;
  ASSERT_TRUE(t.scan(R"({"msg_id": "a-b_1", "msg_type": "apply_reply", "username": "u", "session": "s-1",)"
                     R"( "date": "2026-11-21T10:00:00.000000Z", "version": "5.3"})"));
  EXPECT_EQ(t.id(), "a-b_1");
  EXPECT_EQ(t.type(), "apply_reply");
  EXPECT_EQ(t.session(), "s-1");
}

TEST(JsonScan, IgnoresNestedMembersWithWantedNames) {
  Three t;
  ASSERT_TRUE(t.scan(R"({"x": {"msg_id": "inner", "y": [1, {"msg_type": "no"}, "s"]},)"
                     R"( "z": [[], {}, [{}]], "msg_id": "outer"})"));
  EXPECT_EQ(t.id(), "outer");
  EXPECT_FALSE(t.type().has_value());
  EXPECT_FALSE(t.f[1].present);
}

TEST(JsonScan, DecodesEscapesInValuesAndKeys) {
  Three t;
  ASSERT_TRUE(t.scan(R"({"msg\u005fid": "a\"b\\c\u00e9\ud83d\ude00", "msg_type": "t\n"})"));
  EXPECT_EQ(t.id(), "a\"b\\c\xc3\xa9\xf0\x9f\x98\x80");
  EXPECT_EQ(t.type(), "t\n");
}

TEST(JsonScan, NonStringWantedMemberIsPresentWithoutValue) {
  Three t;
  ASSERT_TRUE(t.scan(R"({"msg_id": 12, "msg_type": null, "session": ["s"]})"));
  for (auto& f : t.f) {
    EXPECT_TRUE(f.present) << f.key;
    EXPECT_FALSE(f.value.has_value()) << f.key;
  }
}

TEST(JsonScan, ReadsBooleans) {
  std::array<ScanField, 4> f{{ScanField("status"), ScanField("dependencies_met"), ScanField("ok"), ScanField("n")}};
  ASSERT_TRUE(scan_object(R"({"dependencies_met": false, "status": "ok", "ok": true, "n": null})", f));
  EXPECT_EQ(f[0].value, "ok");
  EXPECT_FALSE(f[0].boolean.has_value());
  EXPECT_EQ(f[1].boolean, false);
  EXPECT_EQ(f[2].boolean, true);
  EXPECT_TRUE(f[3].present);
  EXPECT_FALSE(f[3].boolean.has_value());
  // A later non-boolean duplicate replaces an earlier boolean, as in nlohmann::json.
  ASSERT_TRUE(scan_object(R"({"ok": true, "ok": "yes"})", std::span(f).subspan(2, 1)));
  EXPECT_FALSE(f[2].boolean.has_value());
  EXPECT_EQ(f[2].value, "yes");
}

TEST(JsonScan, GivesTheRawTextOfOtherValues) {
  std::array<ScanField, 5> f{
      {ScanField("after"), ScanField("timeout"), ScanField("retries"), ScanField("x"), ScanField("s")}};
  ASSERT_TRUE(scan_object(R"({"after": [ ], "timeout": null, "retries": 3, "x": {"a": [1, {}]}, "s": "str"})", f));
  EXPECT_EQ(f[0].raw, "[ ]");
  EXPECT_EQ(f[1].raw, "null");
  EXPECT_EQ(f[2].raw, "3");
  EXPECT_EQ(f[3].raw, R"({"a": [1, {}]})");
  EXPECT_TRUE(f[4].raw.empty());
  EXPECT_EQ(f[4].value, "str");
}

TEST(JsonScan, LastDuplicateWinsLikeNlohmann) {
  const std::string text = R"({"msg_id": "first", "msg_id": "second"})";
  Three t;
  ASSERT_TRUE(t.scan(text));
  EXPECT_EQ(t.id(), json::parse(text)["msg_id"].get<std::string>());
}

TEST(JsonScan, EmptyObjectAndWhitespace) {
  Three t;
  EXPECT_TRUE(t.scan("{}"));
  EXPECT_TRUE(t.scan(" \t\r\n{ \n}\n "));
  ASSERT_TRUE(t.scan(" {\n \"msg_id\"\t:\r\"x\" , \"a\" : true , \"b\":false,\"c\":-1.5e+3 } "));
  EXPECT_EQ(t.id(), "x");
}

TEST(JsonScan, RefusesWhatIsNotAnObject) {
  Three t;
  for (const char* bad :
       {"", "[]", "\"s\"", "1", "{", "{\"a\"}", "{\"a\":}", "{\"a\":1,}", "{\"a\":1} x", "{\"a\":\"unterminated}",
        "{\"a\":[1,2}", "{\"a\":{\"b\":1]}", "{\"a\":tru}", "{\"a\":\"ctl\x01\"}", "{a:1}", "{\"a\":1 \"b\":2}",
        "{\"a\":{1:2}}", "{\"msg_id\":\"bad escape \\x\"}"}) {
    EXPECT_FALSE(t.scan(bad)) << bad;
  }
}

TEST(JsonScan, DeepNestingDoesNotRecurse) {
  Three t;
  std::string deep = "{\"a\":" + std::string(200000, '[') + std::string(200000, ']') + ",\"msg_id\":\"d\"}";
  ASSERT_TRUE(t.scan(deep));
  EXPECT_EQ(t.id(), "d");
  EXPECT_FALSE(t.scan("{\"a\":" + std::string(200000, '[')));
}

// Differential: random objects, dumped by nlohmann, read back by the scanner.
json random_value(std::mt19937& rng, int depth) {
  std::uniform_int_distribution<int> kind(0, depth > 3 ? 4 : 6);
  static const char* words[] = {"msg_id", "msg_type", "session", "x", "é", "a\"b", "\\", "\n", ""};
  auto word = [&] { return std::string(words[rng() % 9]) + std::to_string(rng() % 3); };
  switch (kind(rng)) {
  case 0: return nullptr;
  case 1: return rng() % 2 == 0;
  case 2: return static_cast<int>(rng() % 2000) - 1000;
  case 3: return (static_cast<double>(rng() % 100000) - 50000.0) / 7.0;
  case 4: return word();
  case 5: {
    json a = json::array();
    for (int i = rng() % 4; i > 0; --i) a.push_back(random_value(rng, depth + 1));
    return a;
  }
  default: {
    json o = json::object();
    for (int i = rng() % 4; i > 0; --i) o[word()] = random_value(rng, depth + 1);
    return o;
  }
  }
}

TEST(JsonScan, AgreesWithNlohmannOnRandomObjects) {
  std::mt19937 rng(20261121);
  for (int n = 0; n < 3000; ++n) {
    json obj = json::object();
    for (int i = rng() % 6; i > 0; --i) {
      static const char* keys[] = {"msg_id", "msg_type", "session", "other", "date"};
      obj[keys[rng() % 5]] = random_value(rng, 0);
    }
    std::string text = n % 2 ? obj.dump() : obj.dump(1);
    if (n % 3 == 0) text = obj.dump(-1, ' ', /*ensure_ascii=*/true);
    Three t;
    ASSERT_TRUE(t.scan(text)) << text;
    for (auto& f : t.f) {
      std::string key(f.key);
      ASSERT_EQ(f.present, obj.contains(key)) << text;
      if (obj.contains(key) && obj[key].is_string()) {
        ASSERT_EQ(f.value, obj[key].get<std::string>()) << text;
      } else {
        ASSERT_FALSE(f.value.has_value()) << text;
      }
      if (obj.contains(key) && obj[key].is_boolean()) {
        ASSERT_EQ(f.boolean, obj[key].get<bool>()) << text;
      } else {
        ASSERT_FALSE(f.boolean.has_value()) << text;
      }
    }
  }
}

}  // namespace
