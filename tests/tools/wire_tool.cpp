// wire_tool: lets Python tests drive the C++ wire codec.
//
//   wire_tool [--key KEY] [--scheme hmac-sha256] [--session ID] [--username NAME]
//             [--replay-capacity N] [--max-frames N] [--max-frame-bytes N] [--max-json-bytes N]
//             [--max-identities N] [--max-json-depth N]
//
// One Session lives for the whole run (so its replay guard spans requests). Requests arrive as
// JSON lines on stdin; each gets exactly one JSON line on stdout. Frames travel base64-encoded.
//
//   {"op":"encode", "msg_type":T | "header":{...}, "content":{}, "parent":{}, "metadata":{},
//    "identities":[b64], "buffers":[b64]}                      -> {"ok":true, "frames":[b64]}
//   {"op":"decode", "frames":[b64], "parse_content":true, "check_replay":true}
//        -> {"ok":true, "identities":[b64], "signature":S, "header":{}, "parent":{}, "metadata":{},
//            "content":{}|null, "buffers":[b64]}   or   {"ok":false, "reason":R, "detail":D}
//   {"op":"forward", "frames":[b64], "identities":[b64]?}    -> decode, then forward unchanged
//   {"op":"reencode", "frames":[b64], "parse_content":true, "header":{patch}, "metadata":{patch}}
//        -> decode, merge the patches, re-sign                 -> {"ok":true, "frames":[b64]}
//   {"op":"header", "msg_type":T}                             -> {"ok":true, "header":{...}}
//   {"op":"drops"}                                            -> {"ok":true, "summary":S, "counts":{R:n}}
// A malformed request gets {"ok":false, "error":...} and the tool carries on.
#include "wire/session.hpp"

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace {

using namespace pxf::wire;

constexpr char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string b64encode(std::string_view in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    unsigned v = (unsigned char)in[i] << 16 | (unsigned char)in[i + 1] << 8 | (unsigned char)in[i + 2];
    for (int s : {18, 12, 6, 0}) out.push_back(kB64[(v >> s) & 63]);
  }
  if (std::size_t rest = in.size() - i) {
    unsigned v = (unsigned char)in[i] << 16 | (rest == 2 ? (unsigned char)in[i + 1] << 8 : 0);
    out.push_back(kB64[(v >> 18) & 63]);
    out.push_back(kB64[(v >> 12) & 63]);
    out.push_back(rest == 2 ? kB64[(v >> 6) & 63] : '=');
    out.push_back('=');
  }
  return out;
}

std::string b64decode(std::string_view in) {
  if (in.size() % 4) throw std::invalid_argument("base64 length is not a multiple of 4");
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    throw std::invalid_argument(std::string("bad base64 character '") + c + "'");
  };
  std::string out;
  out.reserve(in.size() / 4 * 3);
  for (std::size_t i = 0; i < in.size(); i += 4) {
    int pad = (in[i + 3] == '=') + (in[i + 2] == '=');
    if (pad && i + 4 != in.size()) throw std::invalid_argument("base64 padding before the end");
    unsigned v = value(in[i]) << 18 | value(in[i + 1]) << 12 | (pad == 2 ? 0 : value(in[i + 2]) << 6) |
                 (pad ? 0 : value(in[i + 3]));
    out.push_back(static_cast<char>(v >> 16));
    if (pad < 2) out.push_back(static_cast<char>(v >> 8 & 0xff));
    if (pad < 1) out.push_back(static_cast<char>(v & 0xff));
  }
  return out;
}

Frames frames_from(const json& req, const char* key) {
  Frames out;
  if (!req.contains(key)) return out;
  for (auto& f : req.at(key)) out.push_back(frame(b64decode(f.get<std::string>())));
  return out;
}

json b64_list(const Frames& frames) {
  json out = json::array();
  for (auto& f : frames) out.push_back(b64encode(view(f)));
  return out;
}

json object_or_empty(const json& req, const char* key) { return req.contains(key) ? req.at(key) : json::object(); }

json refused(const Decoded& d) { return {{"ok", false}, {"reason", to_string(d.reason)}, {"detail", d.detail}}; }

DecodeOptions decode_options(const json& req) {
  return {.parse_content = req.value("parse_content", true), .check_replay = req.value("check_replay", true)};
}

json handle(Session& s, const json& req) {
  const std::string op = req.at("op").get<std::string>();
  if (op == "encode") {
    json header = req.contains("header") ? req.at("header") : s.make_header(req.at("msg_type").get<std::string>());
    Frames out =
        s.encode(frames_from(req, "identities"), header, object_or_empty(req, "parent"),
                 object_or_empty(req, "metadata"), object_or_empty(req, "content"), frames_from(req, "buffers"));
    return {{"ok", true}, {"frames", b64_list(out)}};
  }
  if (op == "header") return {{"ok", true}, {"header", s.make_header(req.at("msg_type").get<std::string>())}};
  if (op == "drops") {
    json counts = json::object();
    for (int i = 1; i < static_cast<int>(Drop::count_); ++i)
      counts[to_string(static_cast<Drop>(i))] = s.drops().get(static_cast<Drop>(i));
    return {{"ok", true}, {"summary", s.drops().summary()}, {"counts", counts}};
  }
  if (op != "decode" && op != "forward" && op != "reencode") throw std::invalid_argument("unknown op '" + op + "'");

  Decoded d = s.decode(frames_from(req, "frames"), decode_options(req));
  if (!d) return refused(d);
  Message& m = *d.msg;
  if (op == "forward") {
    if (req.contains("identities")) m.identities = frames_from(req, "identities");
    return {{"ok", true}, {"frames", b64_list(Session::forward(std::move(m)))}};
  }
  if (op == "reencode") {
    if (req.contains("header")) m.header.merge_patch(req.at("header"));
    if (req.contains("metadata")) m.metadata.merge_patch(req.at("metadata"));
    return {{"ok", true}, {"frames", b64_list(s.reencode(std::move(m)))}};
  }
  return {{"ok", true},
          {"identities", b64_list(m.identities)},
          {"signature", std::string(view(m.signature))},
          {"header", m.header},
          {"parent", m.parent},
          {"metadata", m.metadata},
          {"content", m.content},
          {"buffers", b64_list(m.buffers)}};
}

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr, "wire_tool: %s\nsee the comment at the top of tests/tools/wire_tool.cpp\n", why.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  SessionOptions opts;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (i + 1 >= argc) usage("missing value for " + arg);
    std::string val = argv[++i];
    auto number = [&] {
      try {
        return static_cast<std::size_t>(std::stoull(val));
      } catch (const std::exception&) {
        usage(arg + " needs a number, got '" + val + "'");
      }
    };
    if (arg == "--key") opts.key = val;
    else if (arg == "--scheme") opts.signature_scheme = val;
    else if (arg == "--session") opts.session_id = val;
    else if (arg == "--username") opts.username = val;
    else if (arg == "--replay-capacity") opts.replay_capacity = number();
    else if (arg == "--max-frames") opts.limits.max_frames = number();
    else if (arg == "--max-frame-bytes") opts.limits.max_frame_bytes = number();
    else if (arg == "--max-json-bytes") opts.limits.max_json_bytes = number();
    else if (arg == "--max-identities") opts.limits.max_identities = number();
    else if (arg == "--max-json-depth") opts.limits.max_json_depth = number();
    else usage("unknown option " + arg);
  }
  Session session(opts);  // an unknown scheme throws here: the tool fails loudly

  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    json reply;
    try {
      reply = handle(session, json::parse(line));
    } catch (const std::exception& e) {  // a bad request line, not a codec refusal
      reply = {{"ok", false}, {"error", e.what()}};
    }
    std::cout << dump_json(reply) << '\n' << std::flush;
  }
  return 0;
}
