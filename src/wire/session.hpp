#pragma once
// The wire codec, written once for every process: decode and verify incoming multipart
// messages, encode and sign outgoing ones, and build headers as jupyter_client does.
//
// Concurrency: decode() updates the replay guard and is for one thread at a time; encode(),
// build() and make_header() are safe from any thread.
#include "wire/drop.hpp"
#include "wire/limits.hpp"
#include "wire/message.hpp"
#include "wire/replay_guard.hpp"
#include "wire/signer.hpp"

#include <atomic>
#include <optional>
#include <span>
#include <string>

namespace pxf::wire {

struct SessionOptions {
  std::string key;  // HMAC key; empty = unsigned mode
  std::string signature_scheme = "hmac-sha256";
  std::string session_id;  // default: new_id()
  std::string username = "username";
  Limits limits;
  std::size_t replay_capacity = 65536;  // 0 disables the replay guard
};

struct DecodeOptions {
  // Relays parse only the JSON frames they read; the others are still signed and checked,
  // and stay null in the Message.
  bool parse_parent = true;
  bool parse_metadata = true;
  bool parse_content = true;
  bool check_replay = true;
  // Hot relay paths: the header becomes {msg_id, msg_type[, session]} and the parent
  // {msg_id} (when parse_parent) read by wire::scan_object instead of a full parse; frames
  // that the scanner does not accept are parsed fully, with the usual errors.
  bool header_fields_only = false;
  // With header_fields_only and parse_metadata: when non-empty, the metadata becomes just these
  // top-level members, those that are strings or booleans (read by the scanner; a frame it
  // does not accept is parsed fully). A task reply needs only status, dependencies_met, engine.
  std::span<const std::string_view> metadata_fields{};
  // With header_fields_only and parse_metadata: when every one of these members is absent or
  // null, [], {}, 0 or false (and the frame is an object within the depth limit), the metadata
  // is not parsed and stays null: a plain task submission needs no DOM.
  std::span<const std::string_view> metadata_skip_if_trivial{};
};

// Result of decode(): a message, or the reason it was refused and a human detail.
struct Decoded {
  std::optional<Message> msg;
  Drop reason = Drop::none;
  std::string detail;
  explicit operator bool() const { return msg.has_value(); }
};

class Session {
 public:
  explicit Session(SessionOptions opts = {});

  Decoded decode(Frames&& frames, DecodeOptions opts = {});

  // Serializes and signs a new message.
  Frames encode(Frames identities, const json& header, const json& parent, const json& metadata, const json& content,
                Frames buffers = {}) const;

  // Signs already-serialized JSON frames (e.g. one shared content frame for many targets).
  Frames encode_frames(Frames identities, zmq::message_t header, zmq::message_t parent, zmq::message_t metadata,
                       zmq::message_t content, Frames buffers = {}) const;

  // Re-serializes a message from its parsed fields (after a handler changed them) and re-signs
  // it; identities and buffers are moved. Content decoded unparsed (null) keeps its original bytes.
  Frames reencode(Message&& m) const;

  // Forwards a message unchanged: original JSON frames and signature, m.identities in front.
  static Frames forward(Message&& m);
  // The same layout prefixed by `ids`, sharing `m`'s frames (zmq reference counts; `m` stays intact).
  static Frames forward_shared(Message& m, Frames ids);

  // A new header: unique msg_id "<session>_<pid>_<n>", ISO date with 'Z', version "5.3".
  json make_header(std::string_view msg_type) const;

  // make_header + encode.
  Frames build(Frames identities, std::string_view msg_type, const json& content, const json& parent = json::object(),
               const json& metadata = json::object(), Frames buffers = {}) const;

  const std::string& session_id() const { return session_id_; }
  const std::string& username() const { return username_; }
  const Signer& signer() const { return signer_; }
  const Limits& limits() const { return limits_; }
  DropCounters& drops() { return drops_; }
  const DropCounters& drops() const { return drops_; }

 private:
  Decoded fail(Drop reason, std::string detail);

  Signer signer_;
  std::string session_id_;
  std::string username_;
  Limits limits_;
  ReplayGuard replay_;
  DropCounters drops_;
  std::string pid_;
  mutable std::atomic<std::uint64_t> counter_{0};
};

// JSON text as jupyter_client accepts it: UTF-8, invalid UTF-8 in strings replaced.
std::string dump_json(const json& j);

}  // namespace pxf::wire
