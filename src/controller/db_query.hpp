#pragma once
// Mongo-style queries over task records, as the stock in-memory DictDB answers db_request
// (protocol §4.5): {key: value} is equality, {key: {"$op": value, ...}} applies every operator
// ($lt $gt $lte $gte $eq $ne $in $nin $all $mod $exists). Values compare as Python compares the
// stock records: strings in ISO 8601 form are datetimes, numbers (and bools) compare with each
// other, and an ordering between unrelated types is a TypeError.
//
// Difference from stock: "$gt" means greater-than (stock DictDB compares it backwards).
#include "controller/errors.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace pxf::controller {

// A query the hub cannot run; becomes an error reply with this ename (KeyError for an unknown
// operator, TypeError for values Python would not compare, AttributeError for a non-dict).
using QueryError = PyError;

// Microseconds since the epoch (UTC) of an ISO 8601 date as jupyter_client writes them
// ("2024-01-02T03:04:05.678901Z", offset or no zone allowed; no zone = UTC); nullopt otherwise.
std::optional<std::int64_t> parse_iso_date(const std::string& s);

// Python's fnmatch.fnmatchcase pattern, translated once (ipyparallel 9.1's `$glob`): `*`, `?`,
// `[seq]`, `[!seq]`, no escape character, `*` matches `/` and leading dots; code points, not bytes.
class GlobPattern {
 public:
  explicit GlobPattern(const std::string& pattern_utf8);
  GlobPattern(GlobPattern&&) noexcept;
  GlobPattern& operator=(GlobPattern&&) noexcept;
  ~GlobPattern();
  bool matches(const std::string& name_utf8) const;
  struct Token;  // one piece of the translated pattern (db_query.cpp)

 private:
  std::vector<Token> tokens_;
};

class RecordQuery {
 public:
  // Compiles a query; unknown operators are refused here, before any record is read. Tests run
  // in the query's own key order (a failing one stops the others, as in Python), so give the
  // query as parsed from the wire into an ordered_json.
  explicit RecordQuery(const nlohmann::ordered_json& query);
  explicit RecordQuery(const nlohmann::json& query) : RecordQuery(nlohmann::ordered_json::parse(query.dump())) {}
  // True if `record` (a JSON object; a missing key reads as null) passes every test.
  bool matches(const nlohmann::json& record) const;
  // The top-level keys the query reads.
  std::vector<std::string> keys() const;

 private:
  enum class Op { eq, ne, lt, gt, lte, gte, in, nin, all, mod, exists, glob };
  struct Test {
    std::string key;
    bool composite = false;  // {"$op": ...} rather than a plain value
    nlohmann::json value;    // plain equality
    struct Operand {
      Op op;
      nlohmann::json arg;
      std::optional<GlobPattern> glob;  // $glob with a string pattern: translated once per query
    };
    std::vector<Operand> ops;  // composite
  };
  static bool apply(const Test::Operand& o, const nlohmann::json& a);
  std::vector<Test> tests_;
};

// Python semantics on JSON values, exposed for the unit tests.
bool py_equal(const nlohmann::json& a, const nlohmann::json& b);
// -1, 0, 1; throws QueryError("TypeError") when Python would refuse `a <op> b`.
int py_compare(const nlohmann::json& a, const nlohmann::json& b, const char* op);
// `a in b`; throws QueryError("TypeError") when Python would.
bool py_contains(const nlohmann::json& container, const nlohmann::json& item);
// Python's fnmatch.fnmatchcase(name, pattern) on UTF-8 strings (GlobPattern, translated each call).
bool py_fnmatch(const std::string& name, const std::string& pattern);

}  // namespace pxf::controller
