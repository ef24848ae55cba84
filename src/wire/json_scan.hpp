#pragma once
// Reading a few top-level string (or boolean) members of a JSON object without building a DOM.
//
// Relays need only msg_id, msg_type and session of a header, or msg_id of a parent header;
// a full parse of those frames was a third of pxcontroller's instructions per task. The
// scanner is exact for valid JSON objects; anything it does not understand makes it return
// false, and the caller falls back to the full parser (which then reports the error).
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace pxf::wire {

struct ScanField {
  ScanField() = default;
  explicit ScanField(std::string_view k) : key(k) {}
  std::string_view key;
  std::optional<std::string> value;  // set when the member exists and is a string
  bool present = false;              // the member exists (of any type)
  std::optional<bool> boolean;       // set when the member exists and is true or false
  std::string_view raw;              // a non-string member's JSON text (points into the input)
};

// Scans `text` (one JSON object) for the top-level members named in `fields`. Returns false
// when `text` is not a JSON object this scanner accepts (invalid, or unusual escapes in a
// wanted key or value: the full parser decides). The last occurrence of a repeated key wins,
// as with nlohmann::json.
bool scan_object(std::string_view text, std::span<ScanField> fields);

}  // namespace pxf::wire
