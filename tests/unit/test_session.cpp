// Session: decode/verify/replay-guard, encode/sign, forward, reencode, headers, limits, and every
// Drop reason. Wire layout: [ident..., "<IDS|MSG>", signature, header, parent, metadata, content, buffer...]
#include "wire/session.hpp"

#include <unistd.h>

#include <gtest/gtest.h>

#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace pxf::wire;

constexpr const char* kKey = "pxfabric-test-key";
const std::string kHeader = R"({"msg_id":"peer_1_1","msg_type":"apply_request","session":"peer","version":"5.3"})";

std::string str(const zmq::message_t& m) { return std::string(view(m)); }

SessionOptions keyed(Limits limits = {}) {
  SessionOptions o;
  o.key = kKey;
  o.limits = limits;
  return o;
}

// A signed message from raw JSON frame bytes (signature computed with `key`).
Frames raw_message(std::vector<std::string> identities, std::string h, std::string p, std::string m, std::string c,
                   std::vector<std::string> buffers = {}, const std::string& key = kKey) {
  Signer signer(key);
  Frames out;
  for (auto& i : identities) out.push_back(frame(i));
  out.push_back(frame(kDelimiter));
  out.push_back(frame(signer.sign(h, p, m, c)));
  for (auto* s : {&h, &p, &m, &c}) out.push_back(frame(*s));
  for (auto& b : buffers) out.push_back(frame(b));
  return out;
}

Frames simple_message(std::string content = "{}") { return raw_message({"client"}, kHeader, "{}", "{}", content); }

Frames copy_of(const Frames& f) {
  Frames out;
  for (auto& m : f) out.push_back(frame(view(m)));
  return out;
}

// Asserts a drop with `reason`, a detail mentioning `detail_part`, and exactly one counter bump.
void expect_drop(Session& s, Frames frames, Drop reason, const std::string& detail_part, DecodeOptions o = {}) {
  auto before = s.drops().get(reason);
  auto total = s.drops().total();
  Decoded d = s.decode(std::move(frames), o);
  EXPECT_FALSE(d);
  EXPECT_FALSE(d.msg.has_value());
  EXPECT_EQ(d.reason, reason) << "got " << to_string(d.reason) << ": " << d.detail;
  EXPECT_FALSE(d.detail.empty());
  EXPECT_NE(d.detail.find(detail_part), std::string::npos) << d.detail;
  EXPECT_EQ(s.drops().get(reason), before + 1);
  EXPECT_EQ(s.drops().total(), total + 1);
}

// ---------------------------------------------------------------------------------------------
// Headers

TEST(SessionHeader, MatchesJupyterClientFormat) {
  SessionOptions o = keyed();
  o.session_id = "0123abcd-0123456789abcdef01234567";
  o.username = "alice";
  Session s(o);
  const std::string prefix = o.session_id + "_" + std::to_string(getpid()) + "_";
  static const std::regex date(R"(^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$)");
  for (int n = 1; n <= 3; ++n) {
    json h = s.make_header("execute_request");
    EXPECT_EQ(h["msg_id"], prefix + std::to_string(n));
    EXPECT_EQ(h["msg_type"], "execute_request");
    EXPECT_EQ(h["session"], o.session_id);
    EXPECT_EQ(h["username"], "alice");
    EXPECT_EQ(h["version"], "5.3");
    EXPECT_TRUE(std::regex_match(h["date"].get<std::string>(), date)) << h["date"];
  }
}

TEST(SessionHeader, DefaultSessionIdIsANewId) {
  Session a, b;
  static const std::regex id("^[0-9a-f]{8}-[0-9a-f]{24}$");
  EXPECT_TRUE(std::regex_match(a.session_id(), id)) << a.session_id();
  EXPECT_NE(a.session_id(), b.session_id());
  EXPECT_EQ(a.username(), "username");
}

TEST(SessionHeader, MsgIdsStayUniqueAcrossThreads) {
  Session s;
  constexpr int kThreads = 4, kEach = 2000;
  std::vector<std::vector<std::string>> ids(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) ids[t].push_back(s.make_header("x")["msg_id"]);
    });
  for (auto& th : threads) th.join();
  std::set<std::string> all;
  for (auto& v : ids) all.insert(v.begin(), v.end());
  EXPECT_EQ(all.size(), std::size_t{kThreads * kEach});
}

// ---------------------------------------------------------------------------------------------
// Encode

TEST(SessionEncode, MatchesPythonHmacOverExactFrames) {
  // Digest from /usr/bin/python3: hmac.new(key, b"".join(frames), hashlib.sha256).hexdigest()
  Session s(keyed());
  json header = {{"msg_id", "m1"}, {"msg_type", "status"}, {"session", "s"}};
  json content = {{"execution_state", "busy"}, {"text", "h\u00e9llo \u2713"}};
  Frames f = s.encode({}, header, json::object(), json::object(), content);
  ASSERT_EQ(f.size(), 6u);
  EXPECT_EQ(str(f[0]), kDelimiter);
  EXPECT_EQ(str(f[1]), "22d5ca5b3e5fb17673d6f79ea296ac2843d3d67772849a3bf35e1d62d659926a");
  EXPECT_EQ(str(f[2]), R"({"msg_id":"m1","msg_type":"status","session":"s"})");
  EXPECT_EQ(str(f[3]), "{}");
  EXPECT_EQ(str(f[4]), "{}");
  // ensure_ascii=False: raw UTF-8, not \u escapes.
  EXPECT_EQ(str(f[5]), "{\"execution_state\":\"busy\",\"text\":\"h\xc3\xa9llo \xe2\x9c\x93\"}");
}

TEST(SessionEncode, LayoutIdentitiesFirstBuffersLast) {
  Session s(keyed());
  Frames ids;
  ids.push_back(frame("engine-a"));
  ids.push_back(frame("engine-b"));
  Frames bufs;
  bufs.push_back(frame("buf0"));
  bufs.push_back(frame(""));
  Frames f = s.build(std::move(ids), "apply_request", {{"a", 1}}, json::object(), {{"k", "v"}}, std::move(bufs));
  ASSERT_EQ(f.size(), 10u);
  EXPECT_EQ(str(f[0]), "engine-a");
  EXPECT_EQ(str(f[1]), "engine-b");
  EXPECT_EQ(str(f[2]), kDelimiter);
  EXPECT_EQ(str(f[3]), s.signer().sign(str(f[4]), str(f[5]), str(f[6]), str(f[7])));
  EXPECT_EQ(json::parse(str(f[4]))["msg_type"], "apply_request");
  EXPECT_EQ(str(f[5]), "{}");
  EXPECT_EQ(str(f[6]), R"({"k":"v"})");
  EXPECT_EQ(str(f[7]), R"({"a":1})");
  EXPECT_EQ(str(f[8]), "buf0");
  EXPECT_EQ(str(f[9]), "");
}

TEST(SessionEncode, UnsignedModeSendsEmptySignature) {
  Session s;
  Frames f = s.build({}, "status", {{"execution_state", "idle"}});
  ASSERT_EQ(f.size(), 6u);
  EXPECT_EQ(f[1].size(), 0u);
}

TEST(SessionEncode, MovesBuffersInsteadOfCopying) {
  Session s(keyed());
  Frames bufs;
  bufs.push_back(zmq::message_t(1 << 20));
  const void* data = bufs[0].data();
  Frames f = s.build({}, "data", json::object(), json::object(), json::object(), std::move(bufs));
  EXPECT_EQ(f.back().data(), data);
  EXPECT_EQ(f.back().size(), std::size_t{1} << 20);
}

TEST(SessionEncode, EncodeFramesSignsGivenBytesAndKeepsThem) {
  Session s(keyed());
  std::string content(200, 'x');
  content = "{\"pad\":\"" + content + "\"}";
  zmq::message_t c = frame(content);
  const void* data = c.data();
  Frames f = s.encode_frames({}, frame(kHeader), frame("{}"), frame("{}"), std::move(c));
  ASSERT_EQ(f.size(), 6u);
  EXPECT_EQ(f[5].data(), data);
  EXPECT_EQ(str(f[1]), Signer(kKey).sign(kHeader, "{}", "{}", content));
  Session receiver(keyed());
  EXPECT_TRUE(receiver.decode(std::move(f)));
}

TEST(SessionEncode, DumpJsonReplacesInvalidUtf8) {
  json j = {{"t", std::string("a\xff"
                              "b")}};
  EXPECT_EQ(dump_json(j), "{\"t\":\"a\xef\xbf\xbd"
                          "b\"}");  // U+FFFD, no throw
}

// ---------------------------------------------------------------------------------------------
// Decode: accepted messages

TEST(SessionDecode, RoundTripsEveryPart) {
  Session sender(keyed()), receiver(keyed());
  Frames ids;
  ids.push_back(frame("router-id"));
  Frames bufs;
  bufs.push_back(frame("\x80\x04K*."));  // a pickle; buffers are raw bytes
  json parent = {{"msg_id", "parent-1"}, {"msg_type", "apply_request"}};
  json content = {{"status", "ok"}, {"text", "\xe2\x9c\x93 caf\xc3\xa9 \xf0\x9d\x84\x9e"}};
  Frames f = sender.build(std::move(ids), "apply_reply", content, parent, {{"engine", "e1"}}, std::move(bufs));
  std::string sent_header = str(f[3]);

  Decoded d = receiver.decode(std::move(f));
  ASSERT_TRUE(d) << d.detail;
  EXPECT_EQ(d.reason, Drop::none);
  const Message& m = *d.msg;
  ASSERT_EQ(m.identities.size(), 1u);
  EXPECT_EQ(str(m.identities[0]), "router-id");
  EXPECT_EQ(m.msg_type(), "apply_reply");
  EXPECT_EQ(m.msg_id().rfind(sender.session_id() + "_", 0), 0u);
  EXPECT_EQ(m.session(), sender.session_id());
  EXPECT_EQ(m.parent_msg_id(), "parent-1");
  EXPECT_EQ(m.parent, parent);
  EXPECT_EQ(m.metadata, json({{"engine", "e1"}}));
  EXPECT_EQ(m.content, content);
  EXPECT_EQ(str(m.header_frame), sent_header);
  ASSERT_EQ(m.buffers.size(), 1u);
  EXPECT_EQ(str(m.buffers[0]), "\x80\x04K*.");
  EXPECT_EQ(receiver.drops().total(), 0u);
}

TEST(SessionDecode, KeepsForeignJsonBytesExactly) {
  // Python's json.dumps puts spaces after ':' and ','; the frames are kept as received.
  std::string h = R"({"msg_id": "x_1_1", "msg_type": "execute_request", "date": "2026-11-21T15:50:56.826501Z"})";
  std::string c = R"j({"code": "print(\"hi\")", "silent": false})j";
  Session s(keyed());
  Decoded d = s.decode(raw_message({}, h, "{}", "{}", c));
  ASSERT_TRUE(d) << d.detail;
  EXPECT_TRUE(d.msg->identities.empty());
  EXPECT_EQ(str(d.msg->header_frame), h);
  EXPECT_EQ(str(d.msg->content_frame), c);
  EXPECT_EQ(d.msg->content["code"], "print(\"hi\")");
  EXPECT_EQ(d.msg->parent_msg_id(), "");
}

TEST(SessionDecode, MovesFramesNotCopies) {
  // Frames over zmq's 33-byte inline size live on the heap; a move keeps their data pointer.
  Session s(keyed());
  std::string pad(100, 'p');
  std::string h = R"({"msg_id":"m","msg_type":"t","pad":")" + pad + "\"}";
  std::string c = R"({"pad":")" + pad + "\"}";
  Frames f = raw_message({"identity-" + pad}, h, "{}", "{}", c, {std::string(1 << 16, 'b'), "buffer-" + pad});
  const void* ident = f[0].data();
  const void* header = f[3].data();
  const void* content = f[6].data();
  const void* buf0 = f[7].data();
  const void* buf1 = f[8].data();
  Decoded d = s.decode(std::move(f));
  ASSERT_TRUE(d) << d.detail;
  EXPECT_EQ(d.msg->identities[0].data(), ident);
  EXPECT_EQ(d.msg->header_frame.data(), header);
  EXPECT_EQ(d.msg->content_frame.data(), content);
  EXPECT_EQ(d.msg->buffers[0].data(), buf0);
  EXPECT_EQ(d.msg->buffers[1].data(), buf1);

  Frames out = Session::forward(std::move(*d.msg));
  EXPECT_EQ(out[0].data(), ident);
  EXPECT_EQ(out[3].data(), header);
  EXPECT_EQ(out[7].data(), buf0);
}

TEST(SessionDecode, ShareReferencesTheSameData) {
  zmq::message_t big(4096);
  zmq::message_t shared = share(big);
  EXPECT_EQ(shared.data(), big.data());
  EXPECT_EQ(shared.size(), big.size());
}

TEST(SessionDecode, FirstDelimiterWins) {
  // A buffer that happens to equal the delimiter stays a buffer.
  Session s(keyed());
  Decoded d = s.decode(raw_message({"id"}, kHeader, "{}", "{}", "{}", {std::string(kDelimiter), "x"}));
  ASSERT_TRUE(d) << d.detail;
  ASSERT_EQ(d.msg->buffers.size(), 2u);
  EXPECT_EQ(str(d.msg->buffers[0]), kDelimiter);
  EXPECT_EQ(d.msg->identities.size(), 1u);
}

TEST(SessionDecode, UnparsedContentIsStillVerified) {
  Session s(keyed());
  DecodeOptions peek{.parse_content = false, .check_replay = true};
  // Content that does not parse is fine for a relay that does not read it...
  Decoded d = s.decode(raw_message({}, kHeader, "{}", "{}", "not json"), peek);
  ASSERT_TRUE(d) << d.detail;
  EXPECT_TRUE(d.msg->content.is_null());
  EXPECT_EQ(str(d.msg->content_frame), "not json");
  // ...but it is still covered by the signature.
  Frames tampered = raw_message({}, kHeader, "{}", "{}", R"({"a":1})");
  tampered[5] = frame(R"({"a":2})");
  expect_drop(s, std::move(tampered), Drop::bad_signature, "signature", peek);
}

TEST(SessionDecode, UnsignedModeSkipsSignatureAndReplayChecks) {
  Session s;  // no key
  Frames f = raw_message({}, kHeader, "{}", "{}", "{}", {}, "");
  EXPECT_EQ(f[1].size(), 0u);
  EXPECT_TRUE(s.decode(copy_of(f)));
  EXPECT_TRUE(s.decode(copy_of(f)));  // no replay guard without a key (as jupyter_client)
  f[1] = frame("anything");           // and no signature check
  EXPECT_TRUE(s.decode(std::move(f)));
  EXPECT_EQ(s.drops().total(), 0u);
}

// ---------------------------------------------------------------------------------------------
// Forward and reencode

TEST(SessionForward, ReproducesTheOriginalFrames) {
  Session relay(keyed());
  Frames original = raw_message({"client-a"}, kHeader, R"({"msg_id":"p"})", "{}", R"({"x": 1})", {"b0", "b1"});
  Frames sent = copy_of(original);
  Decoded d = relay.decode(std::move(original));
  ASSERT_TRUE(d) << d.detail;
  Frames out = Session::forward(std::move(*d.msg));
  ASSERT_EQ(out.size(), sent.size());
  for (std::size_t i = 0; i < out.size(); ++i) EXPECT_EQ(str(out[i]), str(sent[i])) << "frame " << i;

  // The original signature travels on: a new receiver accepts it, the relay's guard does not.
  Session engine(keyed());
  EXPECT_TRUE(engine.decode(copy_of(out)));
  expect_drop(relay, std::move(out), Drop::replayed, "replay");
}

TEST(SessionForward, SwapsIdentitiesInFront) {
  Session relay(keyed());
  Decoded d = relay.decode(raw_message({"from-client"}, kHeader, "{}", "{}", "{}"));
  ASSERT_TRUE(d);
  d.msg->identities.clear();
  d.msg->identities.push_back(frame("to-engine"));
  Frames out = Session::forward(std::move(*d.msg));
  ASSERT_EQ(out.size(), 7u);
  EXPECT_EQ(str(out[0]), "to-engine");
  EXPECT_EQ(str(out[1]), kDelimiter);
}

TEST(SessionReencode, ResignsChangedFieldsAndMovesBuffers) {
  Session relay(keyed());
  Frames f = raw_message({"c"}, kHeader, "{}", "{}", R"({"code":"1+1"})", {std::string(4096, 'z')});
  std::string old_sig = str(f[2]);
  Decoded d = relay.decode(std::move(f));
  ASSERT_TRUE(d);
  const void* buf = d.msg->buffers[0].data();
  d.msg->metadata["engine"] = "e7";
  Frames out = relay.reencode(std::move(*d.msg));
  ASSERT_EQ(out.size(), 8u);
  EXPECT_NE(str(out[2]), old_sig);
  EXPECT_EQ(out[7].data(), buf);

  Session engine(keyed());
  Decoded again = engine.decode(std::move(out));
  ASSERT_TRUE(again) << again.detail;
  EXPECT_EQ(again.msg->metadata["engine"], "e7");
  EXPECT_EQ(again.msg->content["code"], "1+1");
  EXPECT_EQ(again.msg->msg_id(), "peer_1_1");
}

TEST(SessionReencode, KeepsUnparsedContentBytes) {
  Session relay(keyed());
  const std::string content = R"({"code": "x = 1",  "silent": false})";  // odd spacing on purpose
  Decoded d = relay.decode(raw_message({}, kHeader, "{}", "{}", content), {.parse_content = false});
  ASSERT_TRUE(d);
  d.msg->header["msg_type"] = "execute_request";
  Frames out = relay.reencode(std::move(*d.msg));
  ASSERT_EQ(out.size(), 6u);
  EXPECT_EQ(str(out[5]), content);  // not "null"
  Session engine(keyed());
  Decoded again = engine.decode(std::move(out));
  ASSERT_TRUE(again) << again.detail;
  EXPECT_EQ(again.msg->msg_type(), "execute_request");
  EXPECT_EQ(again.msg->content["code"], "x = 1");
}

// ---------------------------------------------------------------------------------------------
// Every Drop reason

TEST(SessionDrop, GarbageFrames) {
  Session s(keyed());
  expect_drop(s, {}, Drop::no_delimiter, "delimiter");
  Frames junk;
  junk.push_back(frame(std::string("\x00\xff\xfe garbage", 11)));
  junk.push_back(frame("<IDS|MSG"));     // one byte short
  junk.push_back(frame("<IDS|MSG>\n"));  // one byte long
  junk.push_back(frame("<ids|msg>"));    // case matters
  expect_drop(s, std::move(junk), Drop::no_delimiter, "<IDS|MSG>");
}

TEST(SessionDrop, MissingDelimiter) {
  Session s(keyed());
  Frames f = simple_message();
  f.erase(f.begin() + 1);  // the delimiter
  expect_drop(s, std::move(f), Drop::no_delimiter, "delimiter");
}

TEST(SessionDrop, TooFewFrames) {
  Session s(keyed());
  Frames f = simple_message();
  f.pop_back();  // content
  expect_drop(s, std::move(f), Drop::too_few_frames, "4 frames after the delimiter");
  Frames only;
  only.push_back(frame(kDelimiter));
  expect_drop(s, std::move(only), Drop::too_few_frames, "0 frames");
}

TEST(SessionDrop, InvalidJsonInEachFrame) {
  const char* names[] = {"header", "parent_header", "metadata", "content"};
  for (int which = 0; which < 4; ++which) {
    for (std::string bad : {"", "{\"msg_id\":", "{} trailing", "{'a': 1}", "{\"a\": NaN}", "{\"a\":1,}", "/* c */ {}",
                            "{\"a\":\"\x01\"}"}) {
      std::string parts[4] = {kHeader, "{}", "{}", "{}"};
      parts[which] = bad;
      Session s(keyed());
      SCOPED_TRACE(std::string(names[which]) + " = " + bad);
      expect_drop(s, raw_message({}, parts[0], parts[1], parts[2], parts[3]), Drop::invalid_json, names[which]);
    }
  }
}

TEST(SessionDrop, InvalidUtf8InsideAJsonString) {
  for (std::string bad : {std::string("\xff"), std::string("\xc0\xaf"),  // overlong '/'
                          std::string("\xed\xa0\x80"),                   // UTF-8-encoded surrogate
                          std::string("\xe2\x9c"),                       // truncated sequence
                          std::string("\xf4\x90\x80\x80"),               // above U+10FFFF
                          std::string("\\ud800")}) {                     // lone surrogate escape
    Session s(keyed());
    SCOPED_TRACE(bad);
    expect_drop(s, simple_message("{\"text\":\"ok " + bad + " ok\"}"), Drop::invalid_json, "content");
  }
  // Valid multi-byte text (2, 3, 4 bytes and an escaped surrogate pair) is fine.
  Session s(keyed());
  Decoded d = s.decode(simple_message("{\"text\":\"\xc3\xa9\xe2\x9c\x93\xf0\x9d\x84\x9e\\ud834\\udd1e\"}"));
  ASSERT_TRUE(d) << d.detail;
  EXPECT_EQ(d.msg->content["text"], "\xc3\xa9\xe2\x9c\x93\xf0\x9d\x84\x9e\xf0\x9d\x84\x9e");
}

TEST(SessionDrop, NonObjectJson) {
  const char* names[] = {"header", "parent_header", "metadata", "content"};
  for (int which = 0; which < 4; ++which) {
    for (std::string bad : {"[]", "\"s\"", "1", "null", "true"}) {
      std::string parts[4] = {kHeader, "{}", "{}", "{}"};
      parts[which] = bad;
      Session s(keyed());
      SCOPED_TRACE(std::string(names[which]) + " = " + bad);
      expect_drop(s, raw_message({}, parts[0], parts[1], parts[2], parts[3]), Drop::not_an_object,
                  std::string(names[which]) + " is not a JSON object");
    }
  }
}

TEST(SessionDrop, MissingMsgIdOrMsgType) {
  for (std::string h : {R"({"msg_type":"t"})", R"({"msg_id":"i"})", R"({})", R"({"msg_id":7,"msg_type":"t"})",
                        R"({"msg_id":"i","msg_type":null})", R"({"msg_id":"i","msg_type":["t"]})"}) {
    Session s(keyed());
    SCOPED_TRACE(h);
    expect_drop(s, raw_message({}, h, "{}", "{}", "{}"), Drop::missing_field, "msg_id and msg_type");
  }
}

TEST(SessionDrop, WrongSignature) {
  Session s(keyed());
  expect_drop(s, raw_message({}, kHeader, "{}", "{}", "{}", {}, "some-other-key"), Drop::bad_signature, "HMAC");
  Frames tampered_header = simple_message();
  tampered_header[3] = frame(R"({"msg_id":"peer_1_2","msg_type":"apply_request"})");
  expect_drop(s, std::move(tampered_header), Drop::bad_signature, "HMAC");
  Frames garbage_sig = simple_message();
  garbage_sig[2] = frame("not-hex-at-all");
  expect_drop(s, std::move(garbage_sig), Drop::bad_signature, "HMAC");
  // Buffers are not signed (as in jupyter_client), so changing one is not a signature error.
  Frames with_buffer = raw_message({}, kHeader, "{}", "{}", "{}", {"b"});
  with_buffer.back() = frame("changed");
  EXPECT_TRUE(s.decode(std::move(with_buffer)));
}

TEST(SessionDrop, MissingSignature) {
  Session s(keyed());
  Frames f = simple_message();
  f[2] = frame("");
  expect_drop(s, std::move(f), Drop::unsigned_message, "unsigned");
}

TEST(SessionDrop, Replay) {
  Session s(keyed());
  Frames f = simple_message();
  ASSERT_TRUE(s.decode(copy_of(f)));
  expect_drop(s, copy_of(f), Drop::replayed, "replay");
  // A replay with different identities or buffers is still the same signature.
  Frames rerouted = copy_of(f);
  rerouted[0] = frame("someone-else");
  rerouted.push_back(frame("extra buffer"));
  expect_drop(s, std::move(rerouted), Drop::replayed, "replay");
  // Relays can opt out of the check for a peek.
  EXPECT_TRUE(s.decode(copy_of(f), {.parse_content = true, .check_replay = false}));
}

TEST(SessionDrop, PeekWithoutReplayCheckDoesNotUseUpTheSignature) {
  Session s(keyed());
  Frames f = simple_message();
  EXPECT_TRUE(s.decode(copy_of(f), {.parse_content = false, .check_replay = false}));
  EXPECT_TRUE(s.decode(copy_of(f)));
  expect_drop(s, copy_of(f), Drop::replayed, "replay");
}

TEST(SessionDrop, FailedDecodeDoesNotRecordTheSignature) {
  // Correctly signed, but the content does not parse: refused when content is read, and the
  // guard must not remember it, so a relay that does not read content still accepts it once.
  Session s(keyed());
  Frames f = raw_message({}, kHeader, "{}", "{}", "{not json");
  expect_drop(s, copy_of(f), Drop::invalid_json, "content");
  EXPECT_TRUE(s.decode(copy_of(f), {.parse_content = false}));
  expect_drop(s, copy_of(f), Drop::replayed, "replay", {.parse_content = false});
}

TEST(SessionDrop, ReplayGuardIsBounded) {
  SessionOptions o = keyed();
  o.replay_capacity = 2;
  Session s(o);
  Frames a = simple_message(R"({"n":1})"), b = simple_message(R"({"n":2})"), c = simple_message(R"({"n":3})");
  ASSERT_TRUE(s.decode(copy_of(a)));
  ASSERT_TRUE(s.decode(copy_of(b)));
  expect_drop(s, copy_of(a), Drop::replayed, "replay");
  ASSERT_TRUE(s.decode(copy_of(c)));  // forgets a
  EXPECT_TRUE(s.decode(copy_of(a)));
  expect_drop(s, copy_of(c), Drop::replayed, "replay");

  o.replay_capacity = 0;  // disabled
  Session open(o);
  EXPECT_TRUE(open.decode(copy_of(a)));
  EXPECT_TRUE(open.decode(copy_of(a)));
}

TEST(SessionDrop, OverMaxFrames) {
  Limits l;
  l.max_frames = 8;  // 1 identity + delimiter + 5 + 1 buffer
  Session s(keyed(l));
  EXPECT_TRUE(s.decode(raw_message({"i"}, kHeader, "{}", "{}", R"({"n":1})", {"b"})));
  expect_drop(s, raw_message({"i"}, kHeader, "{}", "{}", R"({"n":2})", {"b", "c"}), Drop::too_many_frames,
              "9 frames (limit 8)");
}

TEST(SessionDrop, OverMaxIdentities) {
  Limits l;
  l.max_identities = 2;
  Session s(keyed(l));
  EXPECT_TRUE(s.decode(raw_message({"a", "b"}, kHeader, "{}", "{}", R"({"n":1})")));
  expect_drop(s, raw_message({"a", "b", "c"}, kHeader, "{}", "{}", R"({"n":2})"), Drop::too_many_frames,
              "3 routing identities (limit 2)");
}

TEST(SessionDrop, OverMaxFrameBytes) {
  Limits l;
  l.max_frame_bytes = 100;
  Session s(keyed(l));
  EXPECT_TRUE(
      s.decode(raw_message({std::string(100, 'i')}, kHeader, "{}", "{}", R"({"n":1})", {std::string(100, 'b')})));
  expect_drop(s, raw_message({}, kHeader, "{}", "{}", R"({"n":2})", {std::string(101, 'b')}), Drop::frame_too_large,
              "101 bytes (limit 100)");
  expect_drop(s, raw_message({std::string(101, 'i')}, kHeader, "{}", "{}", R"({"n":3})"), Drop::frame_too_large,
              "frame 0 has 101 bytes");
  Frames big_sig = simple_message();
  big_sig[2] = frame(std::string(101, 's'));
  expect_drop(s, std::move(big_sig), Drop::frame_too_large, "limit 100");
}

TEST(SessionDrop, OverMaxJsonBytes) {
  Limits l;
  l.max_json_bytes = 100;
  Session s(keyed(l));
  std::string at_limit = "{\"p\":\"" + std::string(100 - 8, 'x') + "\"}";
  ASSERT_EQ(at_limit.size(), 100u);
  // Buffers are held to max_frame_bytes only.
  EXPECT_TRUE(s.decode(raw_message({}, kHeader, "{}", "{}", at_limit, {std::string(1000, 'b')})));
  std::string over = "{\"p\":\"" + std::string(100 - 7, 'x') + "\"}";
  expect_drop(s, raw_message({}, kHeader, "{}", "{}", over), Drop::frame_too_large, "101 bytes (limit 100)");
  expect_drop(s, raw_message({}, kHeader, over, "{}", "{}"), Drop::frame_too_large, "frame 3");
}

TEST(SessionDrop, OverMaxJsonDepth) {
  // Deep nesting parses, but dump/copy recurse per level: without this bound a ~200 KB frame
  // of "[[[[" crashed reencode with a stack overflow.
  auto nested = [](std::size_t depth) {
    return "{\"a\":" + std::string(depth - 1, '[') + std::string(depth - 1, ']') + "}";
  };
  Session s(keyed());
  Decoded ok = s.decode(simple_message(nested(1000)));
  ASSERT_TRUE(ok) << ok.detail;
  EXPECT_EQ(s.reencode(std::move(*ok.msg)).size(), 7u);  // identity + delimiter + 5
  expect_drop(s, simple_message(nested(1001)), Drop::invalid_json, "content nests deeper than 1000 levels");
  expect_drop(s, simple_message(nested(200000)), Drop::invalid_json, "nests deeper");
  // Brackets inside strings (with escaped quotes) are not nesting.
  std::string in_string = "{\"s\":\"\\\"" + std::string(5000, '[') + "\"}";
  EXPECT_TRUE(s.decode(simple_message(in_string)));

  Limits l;
  l.max_json_depth = 2;
  Session shallow(keyed(l));
  EXPECT_TRUE(shallow.decode(simple_message(R"({"a":{"b":1}})")));
  expect_drop(shallow, raw_message({}, R"({"msg_id":"i","msg_type":"t","x":[[1]]})", "{}", "{}", "{}"),
              Drop::invalid_json, "header nests deeper than 2 levels");
}

TEST(SessionDrop, CountersAndSummary) {
  Session s(keyed());
  EXPECT_EQ(s.drops().summary(), "none");
  Frames f = simple_message();
  ASSERT_TRUE(s.decode(copy_of(f)));
  EXPECT_FALSE(s.decode(copy_of(f)));
  EXPECT_FALSE(s.decode(copy_of(f)));
  EXPECT_FALSE(s.decode(raw_message({}, kHeader, "{}", "{}", "{}", {}, "wrong")));
  EXPECT_EQ(s.drops().get(Drop::replayed), 2u);
  EXPECT_EQ(s.drops().get(Drop::bad_signature), 1u);
  EXPECT_EQ(s.drops().get(Drop::none), 0u);
  EXPECT_EQ(s.drops().total(), 3u);
  EXPECT_EQ(s.drops().summary(), "bad_signature=1 replayed=2");
}

TEST(SessionDrop, EveryReasonHasADistinctName) {
  std::set<std::string> names;
  for (int i = 0; i < static_cast<int>(Drop::count_); ++i) names.insert(to_string(static_cast<Drop>(i)));
  EXPECT_EQ(names.size(), static_cast<std::size_t>(Drop::count_));
  EXPECT_EQ(names.count("unknown"), 0u);
  EXPECT_STREQ(to_string(Drop::replayed), "replayed");
}

TEST(SessionOptions, UnknownSchemeThrows) {
  SessionOptions o = keyed();
  o.signature_scheme = "hmac-md17";
  EXPECT_THROW(Session{o}, std::invalid_argument);
}

TEST(SessionMessage, AccessorsOnAHandBuiltMessage) {
  Message m;
  m.header = {{"msg_type", "t"}};
  EXPECT_THROW((void)m.msg_id(), json::exception);  // not undefined behaviour
  EXPECT_EQ(m.msg_type(), "t");
  EXPECT_EQ(m.session(), "");
  m.header["session"] = 5;
  EXPECT_EQ(m.session(), "");  // wrong type falls back
  EXPECT_EQ(get_or<int>(json{{"n", 3}}, "n", 0), 3);
  EXPECT_EQ(get_or<int>(json{{"n", "x"}}, "n", 0), 0);
  EXPECT_EQ(get_or<int>(json::array(), "n", -1), -1);
}

}  // namespace

namespace {
// ---------------------------------------------------------------------------------------------
// header_fields_only: the relays' fast path reads the same fields as a full parse.

TEST(SessionDecodeFast, HeaderAndParentFieldsMatchAFullParse) {
  const std::string parent = R"({"msg_id":"req_7","msg_type":"apply_request","date":"2026","nested":{"msg_id":"no"}})";
  DecodeOptions fast{.parse_parent = true, .parse_metadata = false, .parse_content = false, .header_fields_only = true};
  Session s(keyed());
  Decoded d = s.decode(raw_message({"e", "c"}, kHeader, parent, "{}", "{}"), fast);
  ASSERT_TRUE(d) << d.detail;
  EXPECT_EQ(d.msg->msg_id(), "peer_1_1");
  EXPECT_EQ(d.msg->msg_type(), "apply_request");
  EXPECT_EQ(d.msg->session(), "peer");
  EXPECT_EQ(d.msg->parent_msg_id(), "req_7");
  EXPECT_FALSE(d.msg->header.contains("version"));  // only what relays read
  EXPECT_EQ(str(d.msg->header_frame), kHeader);     // the frames are untouched
  // No parent (stock sends {} for the first message of a session).
  d = s.decode(raw_message({}, kHeader, "{}", "{}", "{}"), fast);
  ASSERT_TRUE(d) << d.detail;
  EXPECT_EQ(d.msg->parent_msg_id(), "");
}

TEST(SessionDecodeFast, BadFramesStillGetTheFullParsersVerdict) {
  DecodeOptions fast{.parse_parent = true, .parse_metadata = false, .parse_content = false, .header_fields_only = true};
  for (std::string bad : {"", "{\"msg_id\":", "{} trailing", "{'a': 1}", "{\"a\":1,}"}) {
    Session s(keyed());
    SCOPED_TRACE(bad);
    expect_drop(s, raw_message({}, bad, "{}", "{}", "{}"), Drop::invalid_json, "header", fast);
    expect_drop(s, raw_message({}, kHeader, bad, "{}", "{}"), Drop::invalid_json, "parent_header", fast);
  }
  Session s(keyed());
  expect_drop(s, raw_message({}, R"({"msg_id": 5, "msg_type": "x"})", "{}", "{}", "{}"), Drop::missing_field, "msg_id",
              fast);
  expect_drop(s, raw_message({}, R"({"msg_type": "x"})", "{}", "{}", "{}"), Drop::missing_field, "msg_id", fast);
  // A parent whose msg_id is not a string is taken by the full parser (it reads as "").
  Decoded d = s.decode(raw_message({}, kHeader, R"({"msg_id": 1})", "{}", "{}"), fast);
  ASSERT_TRUE(d) << d.detail;
  EXPECT_EQ(d.msg->parent_msg_id(), "");
}
}  // namespace

namespace {
using pxf::wire::DecodeOptions;
constexpr std::array<std::string_view, 3> kTaskKeys{"after", "targets", "retries"};
DecodeOptions task_opts() {
  return {.parse_parent = false,
          .parse_metadata = true,
          .parse_content = false,
          .header_fields_only = true,
          .metadata_skip_if_trivial = kTaskKeys};
}
}  // namespace

TEST(SessionDecode, TrivialMetadataIsLeftUnparsedAndEverythingElseParsed) {
  const std::string h = R"({"msg_id": "t_1", "msg_type": "apply_request"})";
  Session s(keyed());
  // every wanted member empty (or absent; other members do not matter): no DOM
  Decoded d =
      s.decode(raw_message({}, h, "{}", R"({"after": [], "targets": null, "retries": 0, "x": [1, {"y": 2}]})", "{}"),
               task_opts());
  ASSERT_TRUE(d) << d.detail;
  EXPECT_TRUE(d.msg->metadata.is_null());
  // one member with a value: parsed as usual
  Decoded e = s.decode(raw_message({}, R"({"msg_id": "t_2", "msg_type": "apply_request"})", "{}",
                                   R"({"after": ["a"], "retries": 0})", "{}"),
                       task_opts());
  ASSERT_TRUE(e) << e.detail;
  EXPECT_EQ(e.msg->metadata["after"], json::array({"a"}));
  // what the full parser refuses is still refused, with its reasons
  Decoded bad = s.decode(
      raw_message({}, R"({"msg_id": "t_3", "msg_type": "apply_request"})", "{}", R"({"after": [})", "{}"), task_opts());
  EXPECT_FALSE(bad);
  EXPECT_EQ(bad.reason, Drop::invalid_json);
  Decoded arr =
      s.decode(raw_message({}, R"({"msg_id": "t_4", "msg_type": "apply_request"})", "{}", "[]", "{}"), task_opts());
  EXPECT_FALSE(arr);
  EXPECT_EQ(arr.reason, Drop::not_an_object);
  std::string deep = R"({"after": [], "x": )" + std::string(1100, '[') + std::string(1100, ']') + "}";
  Decoded d2 =
      s.decode(raw_message({}, R"({"msg_id": "t_5", "msg_type": "apply_request"})", "{}", deep, "{}"), task_opts());
  EXPECT_FALSE(d2);
  EXPECT_EQ(d2.reason, Drop::invalid_json);
}
