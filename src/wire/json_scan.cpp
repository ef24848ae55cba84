#include "wire/json_scan.hpp"

#include <nlohmann/json.hpp>

#include <cctype>

namespace pxf::wire {

namespace {

class Scanner {
 public:
  explicit Scanner(std::string_view s) : s_(s) {}

  bool done() {
    ws();
    return i_ == s_.size();
  }
  bool eat(char c) {
    ws();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  char peek() {
    ws();
    return i_ < s_.size() ? s_[i_] : '\0';
  }
  std::size_t pos() const { return i_; }

  // A string token at the cursor: its raw contents (between the quotes) and whether it holds
  // escapes. Control characters are rejected, as JSON requires.
  bool string(std::string_view& raw, bool& escaped) {
    if (!eat('"')) return false;
    std::size_t start = i_;
    escaped = false;
    while (i_ < s_.size()) {
      unsigned char c = static_cast<unsigned char>(s_[i_]);
      if (c == '"') {
        raw = s_.substr(start, i_ - start);
        ++i_;
        return true;
      }
      if (c < 0x20) return false;
      if (c == '\\') {
        escaped = true;
        if (++i_ >= s_.size()) return false;
      }
      ++i_;
    }
    return false;
  }

  // Skips any value (strings, numbers, literals, nested containers) without recursion.
  // Numbers are skipped by their characters, not validated: the message is authenticated,
  // and only the wanted members are read.
  bool skip_value() {
    std::string stack;  // open containers, '{' or '['
    for (;;) {
      char c = peek();
      if (c == '"') {
        std::string_view raw;
        bool esc;
        if (!string(raw, esc)) return false;
      } else if (c == '{' || c == '[') {
        ++i_;
        char close = c == '{' ? '}' : ']';
        if (!eat(close)) {
          stack.push_back(c);
          if (c == '{' && !member_key()) return false;
          continue;  // the first member's value / the first element
        }
      } else if (c == '-' || (c >= '0' && c <= '9')) {
        while (i_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[i_])) || s_[i_] == '-' || s_[i_] == '+' ||
                                  s_[i_] == '.' || s_[i_] == 'e' || s_[i_] == 'E'))
          ++i_;
      } else if (!literal("true") && !literal("false") && !literal("null")) {
        return false;
      }
      // After a value: the next element or member, or the end of containers.
      for (;;) {
        if (stack.empty()) return true;
        if (eat(',')) {
          if (stack.back() == '{' && !member_key()) return false;
          break;
        }
        if (!eat(stack.back() == '{' ? '}' : ']')) return false;
        stack.pop_back();
      }
    }
  }

 private:
  bool member_key() {
    std::string_view raw;
    bool esc;
    return string(raw, esc) && eat(':');
  }

  bool literal(std::string_view word) {
    ws();
    if (s_.substr(i_, word.size()) != word) return false;
    i_ += word.size();
    return true;
  }

  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }

  std::string_view s_;
  std::size_t i_ = 0;
};

// The contents of a string token with escapes, decoded by the full parser.
bool unescape(std::string_view raw, std::string& out) {
  std::string quoted;
  quoted.reserve(raw.size() + 2);
  quoted += '"';
  quoted += raw;
  quoted += '"';
  auto v = nlohmann::json::parse(quoted, nullptr, false);
  if (!v.is_string()) return false;
  out = v.get<std::string>();
  return true;
}

}  // namespace

bool scan_object(std::string_view text, std::span<ScanField> fields) {
  for (auto& f : fields) {
    f.value.reset();
    f.boolean.reset();
    f.raw = {};
    f.present = false;
  }
  Scanner sc(text);
  if (!sc.eat('{')) return false;
  if (sc.eat('}')) return sc.done();
  for (;;) {
    std::string_view key;
    bool key_escaped = false;
    if (!sc.string(key, key_escaped) || !sc.eat(':')) return false;
    std::string unescaped;
    if (key_escaped) {  // rare: a key written with escapes ("msg\u005fid") still counts
      if (!unescape(key, unescaped)) return false;
      key = unescaped;
    }
    ScanField* want = nullptr;
    for (auto& f : fields)
      if (f.key == key) want = &f;
    if (want && sc.peek() == '"') {
      std::string_view raw;
      bool escaped = false;
      if (!sc.string(raw, escaped)) return false;
      if (escaped) {
        std::string v;
        if (!unescape(raw, v)) return false;
        want->value = std::move(v);
      } else {
        want->value = std::string(raw);
      }
      want->boolean.reset();
      want->raw = {};
      want->present = true;
    } else {
      char first = sc.peek();
      std::size_t start = sc.pos();
      if (!sc.skip_value()) return false;
      if (want) {
        want->value.reset();
        want->boolean.reset();
        want->raw = text.substr(start, sc.pos() - start);
        if (first == 't') want->boolean = true;  // skip_value accepted a literal: true or false
        else if (first == 'f') want->boolean = false;
        want->present = true;
      }
    }
    if (sc.eat(',')) continue;
    if (sc.eat('}')) return sc.done();
    return false;
  }
}

}  // namespace pxf::wire
