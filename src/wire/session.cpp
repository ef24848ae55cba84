#include "wire/session.hpp"
#include "wire/json_scan.hpp"

#include "util/clock.hpp"
#include "util/ids.hpp"

#include <unistd.h>

#include <algorithm>
#include <array>

namespace pxf::wire {

std::string Message::session() const { return get_or<std::string>(header, "session", ""); }

std::string Message::parent_msg_id() const { return get_or<std::string>(parent, "msg_id", ""); }

zmq::message_t share(zmq::message_t& m) {
  zmq::message_t out;
  out.copy(m);
  return out;
}

std::string dump_json(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

Session::Session(SessionOptions opts)
    : signer_(std::move(opts.key), opts.signature_scheme),
      session_id_(opts.session_id.empty() ? new_id() : std::move(opts.session_id)),
      username_(std::move(opts.username)),
      limits_(opts.limits),
      replay_(opts.replay_capacity),
      pid_(std::to_string(getpid())) {}

Decoded Session::fail(Drop reason, std::string detail) {
  drops_.bump(reason);
  Decoded d;
  d.reason = reason;
  d.detail = std::move(detail);
  return d;
}

namespace {
// True if `s` nests [ / { deeper than `limit` outside strings. Runs before the parser because
// nlohmann parses deep input fine but dump/copy/== recurse per level and overflow the stack.
// Exact for valid JSON; on invalid JSON the parser rejects the frame anyway.
bool nests_deeper_than(std::string_view s, std::size_t limit) {
  std::size_t depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    char ch = s[i];
    if (in_string) {
      if (ch == '\\') ++i;
      else if (ch == '"') in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      if (++depth > limit) return true;
    } else if ((ch == ']' || ch == '}') && depth > 0) {
      --depth;
    }
  }
  return false;
}

// Parses one JSON frame into `out`; returns an error text or "" on success.
// Scans `text` for `keys` (at most 8; more are not scanned) and returns use(fields), or false
// when the scanner does not accept `text`.
template <class Use>
bool scan_keys(std::string_view text, std::span<const std::string_view> keys, Use use) {
  if (keys.size() > 8) return false;
  std::array<ScanField, 8> buf;
  for (std::size_t i = 0; i < keys.size(); ++i) buf[i].key = keys[i];
  auto fields = std::span(buf).first(keys.size());
  return scan_object(text, fields) && use(fields);
}

std::string parse_object(const zmq::message_t& f, const char* name, std::size_t max_depth, json& out, Drop& why) {
  auto v = view(f);
  if (nests_deeper_than(v, max_depth)) {
    why = Drop::invalid_json;
    return std::string(name) + " nests deeper than " + std::to_string(max_depth) + " levels";
  }
  out = json::parse(v.begin(), v.end(), nullptr, /*allow_exceptions=*/false);
  if (out.is_discarded()) {
    why = Drop::invalid_json;
    return std::string(name) + " is not valid JSON (or not UTF-8)";
  }
  if (!out.is_object()) {
    why = Drop::not_an_object;
    return std::string(name) + " is not a JSON object";
  }
  return {};
}
}  // namespace

Decoded Session::decode(Frames&& frames, DecodeOptions opts) {
  if (frames.size() > limits_.max_frames)
    return fail(Drop::too_many_frames,
                std::to_string(frames.size()) + " frames (limit " + std::to_string(limits_.max_frames) + ")");
  std::size_t delim = frames.size();
  for (std::size_t i = 0; i < frames.size(); ++i) {
    if (view(frames[i]) == kDelimiter) {
      delim = i;
      break;
    }
  }
  if (delim == frames.size()) return fail(Drop::no_delimiter, "no <IDS|MSG> delimiter frame");
  if (delim > limits_.max_identities)
    return fail(Drop::too_many_frames,
                std::to_string(delim) + " routing identities (limit " + std::to_string(limits_.max_identities) + ")");
  if (frames.size() - delim < 6)
    return fail(Drop::too_few_frames, std::to_string(frames.size() - delim - 1) +
                                          " frames after the delimiter (need signature + 4 JSON frames)");
  for (std::size_t i = 0; i < frames.size(); ++i) {
    bool is_json = i >= delim + 2 && i <= delim + 5;
    std::size_t cap = is_json ? limits_.max_json_bytes : limits_.max_frame_bytes;
    if (frames[i].size() > cap)
      return fail(Drop::frame_too_large, "frame " + std::to_string(i) + " has " + std::to_string(frames[i].size()) +
                                             " bytes (limit " + std::to_string(cap) + ")");
  }

  auto& sig = frames[delim + 1];
  auto& h = frames[delim + 2];
  auto& p = frames[delim + 3];
  auto& m = frames[delim + 4];
  auto& c = frames[delim + 5];
  if (signer_.enabled()) {
    if (sig.size() == 0) return fail(Drop::unsigned_message, "message is unsigned but a key is set");
    if (!signer_.verify(view(sig), view(h), view(p), view(m), view(c)))
      return fail(Drop::bad_signature, "HMAC signature does not match");
    if (opts.check_replay && replay_.seen(view(sig)))
      return fail(Drop::replayed, "signature already accepted once (replayed message)");
  }

  Message msg;
  Drop why = Drop::none;
  const std::size_t depth = limits_.max_json_depth;
  std::string err;
  bool header_done = false, parent_done = false, metadata_done = false;
  if (opts.header_fields_only) {
    std::array<ScanField, 3> hf{{ScanField("msg_id"), ScanField("msg_type"), ScanField("session")}};
    if (scan_object(view(h), hf) && hf[0].value && hf[1].value) {
      msg.header = json::object();
      msg.header["msg_id"] = std::move(*hf[0].value);
      msg.header["msg_type"] = std::move(*hf[1].value);
      if (hf[2].value) msg.header["session"] = std::move(*hf[2].value);
      header_done = true;
    }
    if (opts.parse_parent) {
      std::array<ScanField, 1> pf{{ScanField("msg_id")}};
      if (scan_object(view(p), pf) && (pf[0].value || !pf[0].present)) {
        msg.parent = json::object();
        if (pf[0].value) msg.parent["msg_id"] = std::move(*pf[0].value);
        parent_done = true;
      }
    }
    if (opts.parse_metadata && !opts.metadata_skip_if_trivial.empty()) {
      auto trivial = [](const ScanField& f) {
        return !f.present ||
               (!f.value && (f.raw == "null" || f.raw == "[]" || f.raw == "{}" || f.raw == "0" || f.raw == "false"));
      };
      metadata_done = scan_keys(view(m), opts.metadata_skip_if_trivial, [&](std::span<ScanField> fields) {
        return std::all_of(fields.begin(), fields.end(), trivial) && !nests_deeper_than(view(m), depth);
      });  // metadata stays null
    }
    if (opts.parse_metadata && !metadata_done && !opts.metadata_fields.empty()) {
      metadata_done = scan_keys(view(m), opts.metadata_fields, [&](std::span<ScanField> fields) {
        msg.metadata = json::object();
        for (auto& f : fields) {
          if (f.value) msg.metadata[std::string(f.key)] = std::move(*f.value);
          else if (f.boolean) msg.metadata[std::string(f.key)] = *f.boolean;
        }
        return true;
      });
    }
  }
  if (!header_done) err = parse_object(h, "header", depth, msg.header, why);
  if (err.empty() && opts.parse_parent && !parent_done) err = parse_object(p, "parent_header", depth, msg.parent, why);
  if (err.empty() && opts.parse_metadata && !metadata_done) err = parse_object(m, "metadata", depth, msg.metadata, why);
  if (err.empty() && opts.parse_content) err = parse_object(c, "content", depth, msg.content, why);
  if (!err.empty()) return fail(why, err);
  auto id = msg.header.find("msg_id");
  auto type = msg.header.find("msg_type");
  if (id == msg.header.end() || !id->is_string() || type == msg.header.end() || !type->is_string())
    return fail(Drop::missing_field, "header needs string msg_id and msg_type");

  if (signer_.enabled() && opts.check_replay) replay_.accept(view(sig));

  msg.identities.reserve(delim);
  for (std::size_t i = 0; i < delim; ++i) msg.identities.push_back(std::move(frames[i]));
  msg.signature = std::move(sig);
  msg.header_frame = std::move(h);
  msg.parent_frame = std::move(p);
  msg.metadata_frame = std::move(m);
  msg.content_frame = std::move(c);
  msg.buffers.reserve(frames.size() - delim - 6);
  for (std::size_t i = delim + 6; i < frames.size(); ++i) msg.buffers.push_back(std::move(frames[i]));
  Decoded d;
  d.msg = std::move(msg);
  return d;
}

namespace {
Frames assemble(Frames identities, std::string sig, std::string h, std::string p, std::string m, std::string c,
                Frames buffers) {
  Frames out = std::move(identities);
  out.reserve(out.size() + 6 + buffers.size());
  out.push_back(frame(kDelimiter));
  out.push_back(frame(sig));
  out.push_back(frame(h));
  out.push_back(frame(p));
  out.push_back(frame(m));
  out.push_back(frame(c));
  for (auto& b : buffers) out.push_back(std::move(b));
  return out;
}
}  // namespace

Frames Session::encode(Frames identities, const json& header, const json& parent, const json& metadata,
                       const json& content, Frames buffers) const {
  std::string h = dump_json(header), p = dump_json(parent), m = dump_json(metadata), c = dump_json(content);
  std::string sig = signer_.sign(h, p, m, c);
  return assemble(std::move(identities), std::move(sig), std::move(h), std::move(p), std::move(m), std::move(c),
                  std::move(buffers));
}

Frames Session::encode_frames(Frames identities, zmq::message_t h, zmq::message_t p, zmq::message_t m, zmq::message_t c,
                              Frames buffers) const {
  std::string sig = signer_.sign(view(h), view(p), view(m), view(c));
  Frames out = std::move(identities);
  out.reserve(out.size() + 6 + buffers.size());
  out.push_back(frame(kDelimiter));
  out.push_back(frame(sig));
  out.push_back(std::move(h));
  out.push_back(std::move(p));
  out.push_back(std::move(m));
  out.push_back(std::move(c));
  for (auto& b : buffers) out.push_back(std::move(b));
  return out;
}

Frames Session::reencode(Message&& msg) const {
  // Content decoded with parse_content = false is null here: re-sign its original bytes rather
  // than replace the content with "null".
  if (msg.content.is_null())
    return encode_frames(std::move(msg.identities), frame(dump_json(msg.header)), frame(dump_json(msg.parent)),
                         frame(dump_json(msg.metadata)), std::move(msg.content_frame), std::move(msg.buffers));
  return encode(std::move(msg.identities), msg.header, msg.parent, msg.metadata, msg.content, std::move(msg.buffers));
}

Frames Session::forward(Message&& msg) {
  Frames out = std::move(msg.identities);
  out.reserve(out.size() + 6 + msg.buffers.size());
  out.push_back(frame(kDelimiter));
  out.push_back(std::move(msg.signature));
  out.push_back(std::move(msg.header_frame));
  out.push_back(std::move(msg.parent_frame));
  out.push_back(std::move(msg.metadata_frame));
  out.push_back(std::move(msg.content_frame));
  for (auto& b : msg.buffers) out.push_back(std::move(b));
  return out;
}

Frames Session::forward_shared(Message& m, Frames ids) {
  Frames out = std::move(ids);
  out.reserve(out.size() + 6 + m.buffers.size());
  out.push_back(frame(kDelimiter));
  out.push_back(share(m.signature));
  out.push_back(share(m.header_frame));
  out.push_back(share(m.parent_frame));
  out.push_back(share(m.metadata_frame));
  out.push_back(share(m.content_frame));
  for (auto& b : m.buffers) out.push_back(share(b));
  return out;
}

json Session::make_header(std::string_view msg_type) const {
  auto n = counter_.fetch_add(1, std::memory_order_relaxed) + 1;
  return json{{"msg_id", session_id_ + "_" + pid_ + "_" + std::to_string(n)},
              {"msg_type", msg_type},
              {"username", username_},
              {"session", session_id_},
              {"date", iso_now()},
              {"version", "5.3"}};
}

Frames Session::build(Frames identities, std::string_view msg_type, const json& content, const json& parent,
                      const json& metadata, Frames buffers) const {
  return encode(std::move(identities), make_header(msg_type), parent, metadata, content, std::move(buffers));
}

}  // namespace pxf::wire
