#pragma once
// A decoded Jupyter message.
//
// Layout on the wire:  [ident..., "<IDS|MSG>", signature, header, parent, metadata, content, buffer...]
// The four JSON frames are kept exactly as received, so a relay can forward a message with its
// original signature, and parsed, so handlers can read them. Buffers are never parsed.
#include "wire/frames.hpp"

#include <nlohmann/json.hpp>

#include <string>

namespace pxf::wire {

using json = nlohmann::json;

struct Message {
  Frames identities;
  zmq::message_t signature;
  zmq::message_t header_frame, parent_frame, metadata_frame, content_frame;
  Frames buffers;

  json header;    // always an object with string msg_id and msg_type
  json parent;    // object ({} when there is no parent); null when not parsed
  json metadata;  // object; null when not parsed
  json content;   // object; null when not parsed (DecodeOptions)

  // at(): a hand-built Message without these throws instead of hitting const operator[]'s UB.
  const std::string& msg_id() const { return header.at("msg_id").get_ref<const std::string&>(); }
  const std::string& msg_type() const { return header.at("msg_type").get_ref<const std::string&>(); }
  // The sender's session ("" if absent or not a string).
  std::string session() const;
  // parent_header.msg_id, or "" when there is no parent.
  std::string parent_msg_id() const;
};

// A frame that shares `m`'s data (zmq reference counting: large frames are not copied).
zmq::message_t share(zmq::message_t& m);

// Reads `key` of a JSON object as T, or returns `fallback` when absent or of another type.
template <class T>
T get_or(const json& obj, const char* key, T fallback) {
  if (!obj.is_object()) return fallback;
  auto it = obj.find(key);
  if (it == obj.end()) return fallback;
  try {
    return it->template get<T>();
  } catch (const json::exception&) {
    return fallback;
  }
}

}  // namespace pxf::wire
