// libFuzzer target for the wire parser (Session::decode) and the encoders fed by it.
//
// Input: byte 0 = flags, then frames as [u16 little-endian length][bytes]; a length running past
// the end takes what is left. Flags:
//   bit 0  re-sign the 4 JSON frames after the first delimiter with the fuzz key before the keyed
//          decode, so the keyed path gets past the HMAC check and reaches the parser
//   bit 1  parse_content       bit 2  check_replay       bit 3  also decode with tight Limits
// Every input also goes through the relays' fast path (header_fields_only), which must read the
// same msg_id/msg_type/session/parent msg_id as the full parse whenever that accepts.
// Oracles (abort on violation): forward() reproduces the input frames byte for byte; whatever
// decodes re-encodes into something that decodes to equal JSON; a keyed message accepted with
// check_replay is refused as replayed the second time; accepted messages respect the Limits.
#include "wire/session.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace {

using namespace pxf::wire;

constexpr std::string_view kKey = "fuzz-key";

#define FUZZ_CHECK(cond)                                                                                               \
  do {                                                                                                                 \
    if (!(cond)) {                                                                                                     \
      std::fprintf(stderr, "fuzz oracle failed: %s (line %d)\n", #cond, __LINE__);                                     \
      std::abort();                                                                                                    \
    }                                                                                                                  \
  } while (0)

std::vector<std::string> split(const std::uint8_t* data, std::size_t size) {
  std::vector<std::string> out;
  std::size_t i = 0;
  while (i < size) {
    std::size_t len = data[i];
    if (i + 1 < size) len |= std::size_t{data[i + 1]} << 8;
    i += 2;
    if (i > size) i = size;
    len = std::min(len, size - i);
    out.emplace_back(reinterpret_cast<const char*>(data + i), len);
    i += len;
  }
  return out;
}

Frames to_frames(const std::vector<std::string>& parts) {
  Frames f;
  f.reserve(parts.size());
  for (auto& p : parts) f.push_back(frame(p));
  return f;
}

std::vector<std::string> to_strings(const Frames& f) {
  std::vector<std::string> out;
  for (auto& m : f) out.emplace_back(view(m));
  return out;
}

const Session& check_session(bool keyed) {
  static Session unkeyed_check({.key = "", .replay_capacity = 0});
  static Session keyed_check({.key = std::string(kKey), .replay_capacity = 0});
  return keyed ? keyed_check : unkeyed_check;
}

// Properties every accepted message has, whatever the session.
void check_accepted(const Message& m, const Limits& lim, bool parse_content) {
  FUZZ_CHECK(m.header.is_object() && m.parent.is_object() && m.metadata.is_object());
  FUZZ_CHECK(parse_content ? m.content.is_object() : m.content.is_null());
  (void)m.msg_id();  // accessors must not throw on anything decode accepted
  (void)m.msg_type();
  (void)m.session();
  (void)m.parent_msg_id();
  FUZZ_CHECK(m.identities.size() <= lim.max_identities);
  FUZZ_CHECK(m.identities.size() + 6 + m.buffers.size() <= lim.max_frames);
  for (auto* f : {&m.header_frame, &m.parent_frame, &m.metadata_frame, &m.content_frame})
    FUZZ_CHECK(f->size() <= lim.max_json_bytes);
}

// Re-encodes an accepted message and decodes the result again: the JSON must survive.
void check_reencode(Message m, bool keyed, bool parse_content, Session& decoder) {
  json header = m.header, parent = m.parent, metadata = m.metadata, content = m.content;
  std::string content_bytes(view(m.content_frame));
  std::vector<std::string> buffers = to_strings(m.buffers);
  Frames out = check_session(keyed).reencode(std::move(m));
  Decoded again = decoder.decode(std::move(out), {.parse_content = parse_content, .check_replay = false});
  if (!again) {
    std::fprintf(stderr, "re-encoded message refused: %s: %s\n", to_string(again.reason), again.detail.c_str());
    std::abort();
  }
  FUZZ_CHECK(again.msg->header == header);
  FUZZ_CHECK(again.msg->parent == parent);
  FUZZ_CHECK(again.msg->metadata == metadata);
  if (parse_content) FUZZ_CHECK(again.msg->content == content);
  else FUZZ_CHECK(view(again.msg->content_frame) == content_bytes);
  FUZZ_CHECK(to_strings(again.msg->buffers) == buffers);
}

void check_forward(Message m, const std::vector<std::string>& input) {
  Frames out = Session::forward(std::move(m));
  FUZZ_CHECK(to_strings(out) == input);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t flags = data[0];
  std::vector<std::string> parts = split(data + 1, size - 1);
  const DecodeOptions opts{.parse_content = (flags & 2) != 0, .check_replay = (flags & 4) != 0};

  // Unkeyed: the signature frame is ignored, so every input reaches the parser.
  {
    static Session unkeyed({.key = ""});
    Decoded d = unkeyed.decode(to_frames(parts), opts);
    FUZZ_CHECK(bool(d) == (d.reason == Drop::none));
    FUZZ_CHECK(d || !d.detail.empty());
    if (d) {
      check_accepted(*d.msg, unkeyed.limits(), opts.parse_content);
      Decoded copy = unkeyed.decode(to_frames(parts), opts);  // unkeyed: no replay guard
      FUZZ_CHECK(copy);
      check_forward(std::move(*copy.msg), parts);
      // The relays' fast path (header_fields_only) reads the same fields as the full parse.
      DecodeOptions fast_opts{.parse_parent = true,
                              .parse_metadata = false,
                              .parse_content = false,
                              .check_replay = false,
                              .header_fields_only = true};
      Decoded fast = unkeyed.decode(to_frames(parts), fast_opts);
      FUZZ_CHECK(fast);
      FUZZ_CHECK(fast.msg->msg_id() == d.msg->msg_id() && fast.msg->msg_type() == d.msg->msg_type());
      FUZZ_CHECK(fast.msg->session() == d.msg->session());
      FUZZ_CHECK(fast.msg->parent_msg_id() == d.msg->parent_msg_id());
      check_reencode(std::move(*d.msg), false, opts.parse_content, unkeyed);
    } else {
      // Whatever the fast path accepts has string msg_id and msg_type (and must not crash).
      Decoded fast = unkeyed.decode(to_frames(parts), {.parse_parent = true,
                                                       .parse_metadata = false,
                                                       .parse_content = false,
                                                       .check_replay = false,
                                                       .header_fields_only = true});
      if (fast) (void)fast.msg->msg_id(), (void)fast.msg->msg_type(), (void)fast.msg->parent_msg_id();
    }
  }

  // Keyed: optionally re-sign so the parser and the replay guard are reached.
  {
    std::vector<std::string> signed_parts = parts;
    if (flags & 1) {
      for (std::size_t i = 0; i + 5 < signed_parts.size(); ++i) {
        if (signed_parts[i] != kDelimiter) continue;
        static const Signer signer{std::string(kKey)};
        signed_parts[i + 1] =
            signer.sign(signed_parts[i + 2], signed_parts[i + 3], signed_parts[i + 4], signed_parts[i + 5]);
        break;
      }
    }
    // A fresh guard per input keeps runs reproducible; capacity 1 exercises eviction.
    Session keyed({.key = std::string(kKey), .replay_capacity = 1});
    Decoded d = keyed.decode(to_frames(signed_parts), opts);
    FUZZ_CHECK(keyed.drops().total() == (d ? 0u : 1u));
    if (d) {
      check_accepted(*d.msg, keyed.limits(), opts.parse_content);
      Decoded second = keyed.decode(to_frames(signed_parts), opts);
      if (opts.check_replay) FUZZ_CHECK(!second && second.reason == Drop::replayed);
      else FUZZ_CHECK(second);
      check_forward(std::move(*d.msg), signed_parts);
      Decoded third =
          keyed.decode(to_frames(signed_parts), {.parse_content = opts.parse_content, .check_replay = false});
      FUZZ_CHECK(third);
      static Session receiver({.key = std::string(kKey), .replay_capacity = 0});
      check_reencode(std::move(*third.msg), true, opts.parse_content, receiver);
    }
  }

  // Tight limits: every bound gets hit by small inputs.
  if (flags & 8) {
    Limits tight;
    tight.max_frames = 10;
    tight.max_frame_bytes = 256;
    tight.max_json_bytes = 96;
    tight.max_identities = 2;
    tight.max_json_depth = 4;
    static Session small({.key = "", .limits = tight});
    Decoded d = small.decode(to_frames(parts), opts);
    if (d) {
      check_accepted(*d.msg, tight, opts.parse_content);
      for (auto& b : d.msg->buffers) FUZZ_CHECK(b.size() <= tight.max_frame_bytes);
    }
  }
  return 0;
}
