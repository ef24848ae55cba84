#include "controller/pyjson.hpp"
#include "controller/db_query.hpp"

#include <cmath>
#include <cstring>

namespace pxf::controller {

using nlohmann::json;

namespace {

bool digits(const std::string& s, std::size_t pos, std::size_t n) {
  if (pos + n > s.size()) return false;
  for (std::size_t i = pos; i < pos + n; ++i)
    if (s[i] < '0' || s[i] > '9') return false;
  return true;
}

int num(const std::string& s, std::size_t pos, std::size_t n) {
  int v = 0;
  for (std::size_t i = pos; i < pos + n; ++i) v = v * 10 + (s[i] - '0');
  return v;
}

// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
std::int64_t days_from_civil(int y, unsigned m, unsigned d) {
  y -= m <= 2;
  const std::int64_t era = (y >= 0 ? y : y - 399) / 400;
  const unsigned yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<std::int64_t>(doe) - 719468;
}

enum class Kind { none, number, str, date, list, dict, other };

struct Value {
  Kind kind;
  double number = 0;
  std::int64_t date = 0;
};

Value classify(const json& j) {
  switch (j.type()) {
  case json::value_t::null: return {Kind::none};
  case json::value_t::boolean: return {Kind::number, j.get<bool>() ? 1.0 : 0.0};
  case json::value_t::number_integer:
  case json::value_t::number_unsigned:
  case json::value_t::number_float: return {Kind::number, j.get<double>()};
  case json::value_t::string: {
    if (auto d = parse_iso_date(j.get_ref<const std::string&>())) return {Kind::date, 0, *d};
    return {Kind::str};
  }
  case json::value_t::array: return {Kind::list};
  case json::value_t::object: return {Kind::dict};
  default: return {Kind::other};
  }
}

// As controller::py_type, but ISO dates are datetimes (the stock DictDB holds datetime objects).
const char* db_type(const json& j) {
  if (j.is_string() && parse_iso_date(j.get_ref<const std::string&>())) return "datetime.datetime";
  return controller::py_type(j);
}

[[noreturn]] void type_error(const std::string& msg) { throw QueryError("TypeError", msg); }

}  // namespace

std::optional<std::int64_t> parse_iso_date(const std::string& s) {
  // ^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:?\d{2})?$ (jupyter_client's pattern)
  if (s.size() < 19 || !digits(s, 0, 4) || s[4] != '-' || !digits(s, 5, 2) || s[7] != '-' || !digits(s, 8, 2) ||
      s[10] != 'T' || !digits(s, 11, 2) || s[13] != ':' || !digits(s, 14, 2) || s[16] != ':' || !digits(s, 17, 2))
    return std::nullopt;
  int y = num(s, 0, 4), mo = num(s, 5, 2), d = num(s, 8, 2), h = num(s, 11, 2), mi = num(s, 14, 2), se = num(s, 17, 2);
  if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || se > 59) return std::nullopt;
  std::size_t pos = 19;
  std::int64_t micros = 0;
  if (pos < s.size() && s[pos] == '.') {
    std::size_t start = ++pos;
    while (pos < s.size() && pos - start < 6 && s[pos] >= '0' && s[pos] <= '9') ++pos;
    std::size_t n = pos - start;
    if (n == 0) return std::nullopt;
    micros = num(s, start, n);
    for (std::size_t i = n; i < 6; ++i) micros *= 10;
  }
  std::int64_t offset_s = 0;
  if (pos < s.size()) {
    if (s[pos] == 'Z') {
      ++pos;
    } else if (s[pos] == '+' || s[pos] == '-') {
      int sign = s[pos] == '-' ? -1 : 1;
      ++pos;
      if (!digits(s, pos, 2)) return std::nullopt;
      int oh = num(s, pos, 2);
      pos += 2;
      if (pos < s.size() && s[pos] == ':') ++pos;
      if (!digits(s, pos, 2)) return std::nullopt;
      int om = num(s, pos, 2);
      pos += 2;
      offset_s = sign * (oh * 3600 + om * 60);
    } else {
      return std::nullopt;
    }
  }
  if (pos != s.size()) return std::nullopt;
  std::int64_t secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset_s;
  return secs * 1000000 + micros;
}

bool py_equal(const json& a, const json& b) {
  Value va = classify(a), vb = classify(b);
  if (va.kind != vb.kind) return false;
  switch (va.kind) {
  case Kind::none: return true;
  case Kind::number: return va.number == vb.number;
  case Kind::date: return va.date == vb.date;
  case Kind::str: return a.get_ref<const std::string&>() == b.get_ref<const std::string&>();
  case Kind::list: {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
      if (!py_equal(a[i], b[i])) return false;
    return true;
  }
  case Kind::dict: {
    if (a.size() != b.size()) return false;
    for (auto it = a.begin(); it != a.end(); ++it) {
      auto jt = b.find(it.key());
      if (jt == b.end() || !py_equal(*it, *jt)) return false;
    }
    return true;
  }
  default: return a == b;
  }
}

int py_compare(const json& a, const json& b, const char* op) {
  Value va = classify(a), vb = classify(b);
  auto refuse = [&] {
    type_error(std::string("'") + op + "' not supported between instances of '" + db_type(a) + "' and '" + db_type(b) +
               "'");
  };
  if (va.kind != vb.kind) refuse();
  switch (va.kind) {
  case Kind::number: return va.number < vb.number ? -1 : va.number > vb.number ? 1 : 0;
  case Kind::date: return va.date < vb.date ? -1 : va.date > vb.date ? 1 : 0;
  case Kind::str: {
    int c = a.get_ref<const std::string&>().compare(b.get_ref<const std::string&>());
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  case Kind::list: {
    std::size_t n = std::min(a.size(), b.size());
    for (std::size_t i = 0; i < n; ++i)
      if (!py_equal(a[i], b[i])) return py_compare(a[i], b[i], op);
    return a.size() < b.size() ? -1 : a.size() > b.size() ? 1 : 0;
  }
  default: refuse();
  }
  return 0;
}

bool py_contains(const json& container, const json& item) {
  if (container.is_array()) {
    for (auto& x : container)
      if (py_equal(item, x)) return true;
    return false;
  }
  if (container.is_string()) {
    if (!item.is_string())
      type_error(std::string("'in <string>' requires string as left operand, not ") + db_type(item));
    return container.get_ref<const std::string&>().find(item.get_ref<const std::string&>()) != std::string::npos;
  }
  if (container.is_object()) {
    if (item.is_array() || item.is_object()) type_error(std::string("unhashable type: '") + db_type(item) + "'");
    return item.is_string() && container.contains(item.get_ref<const std::string&>());
  }
  type_error(std::string("argument of type '") + db_type(container) + "' is not iterable");
}

namespace {
// Code points of a UTF-8 string (Python matches characters, not bytes); a byte that does not
// start a valid sequence stands for itself.
std::u32string code_points(const std::string& s) {
  std::u32string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    int extra = c >= 0xF0 && c < 0xF8 ? 3 : c >= 0xE0 ? 2 : c >= 0xC0 ? 1 : 0;
    if (c >= 0xF8 || (c >= 0x80 && c < 0xC0) || i + extra >= s.size()) extra = 0;
    char32_t cp = extra == 0 ? c : c & (0x3F >> extra);
    bool ok = true;
    for (int k = 1; k <= extra && ok; ++k) {
      auto d = static_cast<unsigned char>(s[i + k]);
      ok = (d & 0xC0) == 0x80;
      cp = (cp << 6) | (d & 0x3F);
    }
    if (!ok) extra = 0, cp = c;
    out.push_back(cp);
    i += 1 + extra;
  }
  return out;
}

}  // namespace

// One element of a translated pattern (fnmatch.translate's pieces).
struct GlobPattern::Token {
  enum Kind { literal, any, star, set } kind;
  explicit Token(Kind k, char32_t ch = 0) : kind(k), c(ch) {}
  char32_t c;
  bool negated = false;
  std::vector<std::pair<char32_t, char32_t>> ranges;  // set: inclusive; an empty one never matches
  bool matches(char32_t x) const {
    if (kind == literal) return x == c;
    if (kind == any) return true;
    bool in = false;
    for (auto [lo, hi] : ranges) in = in || (lo <= x && x <= hi);
    return in != negated;
  }
};

// fnmatch.translate: a '[' without its ']' is a literal; the first ']' after '[' or '[!' belongs
// to the set; `a-z` is a range, a '-' first or last is literal; a reversed range matches nothing.
namespace {
std::vector<GlobPattern::Token> translate_glob(const std::u32string& p) {
  std::vector<GlobPattern::Token> out;
  std::size_t i = 0, n = p.size();
  while (i < n) {
    char32_t c = p[i++];
    if (c == U'*') {
      if (out.empty() || out.back().kind != GlobPattern::Token::star) out.emplace_back(GlobPattern::Token::star);
    } else if (c == U'?') {
      out.emplace_back(GlobPattern::Token::any);
    } else if (c == U'[') {
      std::size_t j = i;
      if (j < n && p[j] == U'!') ++j;
      if (j < n && p[j] == U']') ++j;
      while (j < n && p[j] != U']') ++j;
      if (j >= n) {
        out.emplace_back(GlobPattern::Token::literal, U'[');
        continue;
      }
      GlobPattern::Token t(GlobPattern::Token::set);
      std::size_t k = i;
      if (p[k] == U'!') t.negated = true, ++k;
      while (k < j) {
        if (k + 2 < j && p[k + 1] == U'-') {
          t.ranges.emplace_back(p[k], p[k + 2]);
          k += 3;
        } else {
          t.ranges.emplace_back(p[k], p[k]);
          ++k;
        }
      }
      out.push_back(std::move(t));
      i = j + 1;
    } else {
      out.emplace_back(GlobPattern::Token::literal, c);
    }
  }
  return out;
}
}  // namespace

GlobPattern::GlobPattern(const std::string& pattern_utf8) : tokens_(translate_glob(code_points(pattern_utf8))) {}
GlobPattern::GlobPattern(GlobPattern&&) noexcept = default;
GlobPattern& GlobPattern::operator=(GlobPattern&&) noexcept = default;
GlobPattern::~GlobPattern() = default;

bool py_fnmatch(const std::string& name_utf8, const std::string& pattern_utf8) {
  return GlobPattern(pattern_utf8).matches(name_utf8);
}

bool GlobPattern::matches(const std::string& name_utf8) const {
  const std::u32string name = code_points(name_utf8);
  const std::vector<Token>& pat = tokens_;
  // Greedy match with one backtrack point (the last '*'): linear in practice, never exponential.
  std::size_t s = 0, t = 0, star_t = std::string::npos, star_s = 0;
  while (s < name.size()) {
    if (t < pat.size() && pat[t].kind == GlobPattern::Token::star) {
      star_t = t++;
      star_s = s;
    } else if (t < pat.size() && pat[t].matches(name[s])) {
      ++s, ++t;
    } else if (star_t != std::string::npos) {
      t = star_t + 1;
      s = ++star_s;
    } else {
      return false;
    }
  }
  while (t < pat.size() && pat[t].kind == GlobPattern::Token::star) ++t;
  return t == pat.size();
}

RecordQuery::RecordQuery(const nlohmann::ordered_json& query) {
  auto plain = [](const nlohmann::ordered_json& j) { return json::parse(j.dump()); };
  if (!query.is_object())
    throw QueryError("AttributeError", std::string("'") + db_type(plain(query)) + "' object has no attribute 'items'");
  static const std::pair<const char*, Op> names[] = {{"$lt", Op::lt},   {"$gt", Op::gt},         {"$eq", Op::eq},
                                                     {"$ne", Op::ne},   {"$lte", Op::lte},       {"$gte", Op::gte},
                                                     {"$in", Op::in},   {"$nin", Op::nin},       {"$all", Op::all},
                                                     {"$mod", Op::mod}, {"$exists", Op::exists}, {"$glob", Op::glob}};
  for (auto it = query.begin(); it != query.end(); ++it) {
    Test t;
    t.key = it.key();
    if (it->is_object()) {
      t.composite = true;
      for (auto op = it->begin(); op != it->end(); ++op) {
        const Op* found = nullptr;
        for (auto& [name, o] : names)
          if (op.key() == name) found = &o;
        if (!found) throw QueryError("KeyError", "'" + op.key() + "'");
        Test::Operand o{*found, plain(*op), std::nullopt};
        if (o.op == Op::glob && o.arg.is_string()) o.glob.emplace(o.arg.get_ref<const std::string&>());
        t.ops.push_back(std::move(o));
      }
    } else {
      t.value = plain(*it);
    }
    tests_.push_back(std::move(t));
  }
}

std::vector<std::string> RecordQuery::keys() const {
  std::vector<std::string> out;
  for (auto& t : tests_) out.push_back(t.key);
  return out;
}

bool RecordQuery::apply(const Test::Operand& o, const json& a) {
  const json& b = o.arg;
  switch (o.op) {
  case Op::eq: return py_equal(a, b);
  case Op::ne: return !py_equal(a, b);
  case Op::lt: return py_compare(a, b, "<") < 0;
  case Op::gt: return py_compare(a, b, ">") > 0;
  case Op::lte: return py_compare(a, b, "<=") <= 0;
  case Op::gte: return py_compare(a, b, ">=") >= 0;
  case Op::in: return py_contains(b, a);
  case Op::nin: return !py_contains(b, a);
  case Op::all: {
    // stock: all([a in bb for bb in b])
    if (b.is_array()) {
      for (auto& bb : b)
        if (!py_contains(bb, a)) return false;
      return true;
    }
    if (b.is_string()) {
      for (char c : b.get_ref<const std::string&>())
        if (!py_contains(json(std::string(1, c)), a)) return false;
      return true;
    }
    type_error(std::string("'") + db_type(b) + "' object is not iterable");
  }
  case Op::mod: {
    // stock: a % b[0] == b[1]
    if (!b.is_array() && !b.is_string() && !b.is_object())
      type_error(std::string("'") + db_type(b) + "' object is not subscriptable");
    if (!b.is_array() || b.size() < 2) throw QueryError("IndexError", "list index out of range");
    const json& d = b[0];
    if (!a.is_number() && !a.is_boolean())
      type_error(std::string("unsupported operand type(s) for %: '") + db_type(a) + "' and '" + db_type(d) + "'");
    if (!d.is_number() && !d.is_boolean())
      type_error(std::string("unsupported operand type(s) for %: '") + db_type(a) + "' and '" + db_type(d) + "'");
    double x = a.get<double>(), y = d.get<double>();
    if (y == 0) throw QueryError("ZeroDivisionError", "integer division or modulo by zero");
    double r = std::fmod(x, y);
    if (r != 0 && ((r < 0) != (y < 0))) r += y;  // Python's sign convention
    return py_equal(json(r), b[1]);
  }
  case Op::exists: {
    bool want = truthy(b);
    return want ? !a.is_null() : a.is_null();
  }
  case Op::glob: {
    // stock 9.1: fnmatch.fnmatch(a, b) if a is not None else False
    if (a.is_null()) return false;
    for (const json* v : {&a, &b})
      if (!v->is_string()) type_error(std::string("expected str, bytes or os.PathLike object, not ") + db_type(*v));
    return o.glob->matches(a.get_ref<const std::string&>());  // b is a string: compiled
  }
  }
  return false;
}

bool RecordQuery::matches(const json& record) const {
  static const json null;
  for (auto& t : tests_) {
    auto it = record.find(t.key);
    const json& v = it == record.end() ? null : *it;
    if (!t.composite) {
      if (!py_equal(v, t.value)) return false;
      continue;
    }
    for (auto& o : t.ops)
      if (!apply(o, v)) return false;
  }
  return true;
}

}  // namespace pxf::controller
