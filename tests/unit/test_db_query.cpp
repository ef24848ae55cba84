// db_request matching as the stock DictDB does it (protocol §4.5), with Python's comparison rules.
#include "controller/db_query.hpp"

#include <gtest/gtest.h>

using namespace pxf::controller;
using nlohmann::json;

namespace {
json rec(const char* id, const char* completed, int n, const char* queue = "task") {
  return {{"msg_id", id},
          {"completed", completed ? json(completed) : json()},
          {"submitted", "2026-01-01T00:00:00.000001Z"},
          {"n", n},
          {"queue", queue},
          {"stdout", ""},
          {"header", {{"msg_id", id}, {"date", "2026-01-01T00:00:00Z"}}}};
}

bool match(const json& q, const json& r) { return RecordQuery(q).matches(r); }

std::string ename(const json& q, const json& r) {
  try {
    RecordQuery(q).matches(r);
  } catch (const QueryError& e) {
    return e.ename;
  }
  return "";
}
} // namespace

TEST(IsoDate, Parses) {
  auto a = parse_iso_date("2026-01-01T00:00:00Z");
  auto b = parse_iso_date("2026-01-01T00:00:00.5Z");
  auto c = parse_iso_date("2026-01-01T01:00:00+01:00");
  auto d = parse_iso_date("2026-01-01T00:00:00.000001");
  ASSERT_TRUE(a && b && c && d);
  EXPECT_EQ(*b - *a, 500000);
  EXPECT_EQ(*a, *c);
  EXPECT_EQ(*d - *a, 1);
  EXPECT_EQ(*a, 1767225600LL * 1000000);
  EXPECT_FALSE(parse_iso_date("2026-01-01"));
  EXPECT_FALSE(parse_iso_date("not a date"));
  EXPECT_FALSE(parse_iso_date("2026-01-01T00:00:00Zjunk"));
}

TEST(RecordQuery, Equality) {
  auto r = rec("a", "2026-01-01T00:00:01Z", 3);
  EXPECT_TRUE(match({{"msg_id", "a"}}, r));
  EXPECT_FALSE(match({{"msg_id", "b"}}, r));
  EXPECT_TRUE(match({{"n", 3.0}}, r));           // 3 == 3.0
  EXPECT_TRUE(match({{"missing", nullptr}}, r));  // a missing key reads as None
  EXPECT_TRUE(match(json::object(), r));
  EXPECT_TRUE(match({{"completed", "2026-01-01T00:00:01.000000Z"}}, r));  // dates, not strings
  // A dict value is a set of operators, never a value to compare (stock CompositeFilter).
  EXPECT_THROW(match({{"header", {{"date", "2026-01-01T00:00:00.000Z"}, {"msg_id", "a"}}}}, r), QueryError);
}

TEST(RecordQuery, Operators) {
  auto r = rec("a", "2026-01-01T00:00:01Z", 3);
  EXPECT_TRUE(match({{"n", {{"$lt", 4}}}}, r));
  EXPECT_FALSE(match({{"n", {{"$lt", 3}}}}, r));
  EXPECT_TRUE(match({{"n", {{"$lte", 3}}}}, r));
  EXPECT_TRUE(match({{"n", {{"$gt", 2}}}}, r));  // greater-than (stock compares backwards)
  EXPECT_FALSE(match({{"n", {{"$gt", 4}}}}, r));
  EXPECT_TRUE(match({{"n", {{"$gte", 3}}}}, r));
  EXPECT_TRUE(match({{"n", {{"$eq", 3}}}}, r));
  EXPECT_TRUE(match({{"n", {{"$ne", 4}}}}, r));
  EXPECT_TRUE(match({{"n", {{"$gt", 1}, {"$lt", 5}}}}, r));
  EXPECT_FALSE(match({{"n", {{"$gt", 1}, {"$lt", 3}}}}, r));
  EXPECT_TRUE(match({{"msg_id", {{"$in", {"x", "a"}}}}}, r));
  EXPECT_FALSE(match({{"msg_id", {{"$nin", {"x", "a"}}}}}, r));
  EXPECT_TRUE(match({{"msg_id", {{"$nin", json::array()}}}}, r));
  EXPECT_TRUE(match({{"queue", {{"$in", "task queue"}}}}, r));  // Python `str in str`
  EXPECT_TRUE(match({{"completed", {{"$ne", nullptr}}}}, r));
  EXPECT_TRUE(match({{"completed", {{"$exists", true}}}}, r));
  EXPECT_TRUE(match({{"missing", {{"$exists", false}}}}, r));
  EXPECT_TRUE(match({{"n", {{"$mod", {2, 1}}}}}, r));
  EXPECT_TRUE(match({{"completed", {{"$gt", "2026-01-01T00:00:00.999999Z"}}}}, r));
  EXPECT_FALSE(match({{"completed", {{"$lt", "2026-01-01T00:00:00.999999+00:00"}}}}, r));
  EXPECT_TRUE(match({{"submitted", {{"$lt", "2026-01-01T00:00:01Z"}}}}, r));
}

TEST(RecordQuery, ErrorsAreThePythonOnes) {
  auto pending = rec("p", nullptr, 1);
  EXPECT_EQ(ename({{"n", {{"$foo", 1}}}}, pending), "KeyError");
  EXPECT_THROW(RecordQuery(json{{"n", {{"$regex", "x"}}}}), QueryError);  // before any record
  EXPECT_EQ(ename({{"completed", {{"$lt", "2026-01-01T00:00:00Z"}}}}, pending), "TypeError");  // None < datetime
  EXPECT_EQ(ename({{"msg_id", {{"$gt", 5}}}}, pending), "TypeError");
  EXPECT_EQ(ename({{"msg_id", {{"$in", 5}}}}, pending), "TypeError");
  EXPECT_EQ(ename({{"n", {{"$in", "abc"}}}}, pending), "TypeError");
  EXPECT_EQ(ename({{"n", {{"$mod", {0, 1}}}}}, pending), "ZeroDivisionError");
  EXPECT_EQ(ename(json::array({1}), pending), "AttributeError");
  // equality never raises across types
  EXPECT_EQ(ename({{"msg_id", {{"$eq", 5}}}}, pending), "");
  EXPECT_EQ(ename({{"completed", {{"$ne", "2026-01-01T00:00:00Z"}}}}, pending), "");
}

TEST(PySemantics, CompareAndContains) {
  EXPECT_EQ(py_compare(json::array({1, 2}), json::array({1, 3}), "<"), -1);
  EXPECT_EQ(py_compare(json::array({1, 2}), json::array({1, 2, 0}), "<"), -1);
  EXPECT_EQ(py_compare(true, 0, "<"), 1);
  EXPECT_EQ(py_compare("b", "a", "<"), 1);
  EXPECT_THROW(py_compare(json::object(), json::object(), "<"), QueryError);
  EXPECT_TRUE(py_equal(json{{"a", 1}}, json{{"a", 1.0}}));
  EXPECT_FALSE(py_equal("1", 1));
  EXPECT_TRUE(py_contains(json{{"k", 1}}, "k"));
  EXPECT_THROW(py_contains(json{{"k", 1}}, json::array()), QueryError);
}
