// Gateway (rank 0's end of the fabric link, docs/fabric-link.md) driven without MPI: a fake Sink
// records what would go to the ranks, and a real ZeroMQ ROUTER on inproc:// plays the
// controller's fabric port (real sockets, real signing). Covers registration, routing of
// requests to ranks and of replies to the controller, broadcasts (fan-out and coalescing of
// the replies), ranks going down, pxf_shutdown, and the heartbeat's lost-controller check.
#include "gateway/gateway.hpp"
#include "link/protocol.hpp"

#include "util/clock.hpp"
#include "util/ids.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace pxf;
using gateway::Frames;
using gateway::json;
using wire::frame;
using wire::view;

constexpr const char* kKey = "gateway-test-key";

std::string str(const zmq::message_t& m) { return std::string(view(m)); }

std::vector<std::string> strs(const Frames& f) {
  std::vector<std::string> out;
  for (auto& m : f) out.push_back(str(m));
  return out;
}

wire::SessionOptions keyed(std::string key = kKey) {
  wire::SessionOptions o;
  o.key = std::move(key);
  return o;
}

// What the MPI side would get.
struct FakeSink : gateway::Sink {
  std::vector<std::pair<int, Frames>> to_ranks;
  std::vector<Frames> to_alls;
  std::vector<std::pair<int, std::string>> ended;
  void to_rank(int rank, Frames&& frames) override { to_ranks.emplace_back(rank, std::move(frames)); }
  void to_all(Frames&& frames) override { to_alls.push_back(std::move(frames)); }
  void end_job(int code, const std::string& reason) override { ended.emplace_back(code, reason); }
  std::size_t count() const { return to_ranks.size() + to_alls.size() + ended.size(); }
};

// The controller's end: a ROUTER bound on inproc, signing and verifying with the job's key.
struct FakeController {
  explicit FakeController(zmq::context_t& ctx, std::string key = kKey)
      : url("inproc://pxf-gateway-test-" + new_id()),
        router(ctx, zmq::socket_type::router),
        session(keyed(key)) {
    router.set(zmq::sockopt::linger, 0);
    router.bind(url);
  }

  // The next message from `from` (the job uuid, or "<job>/hb"), others skipped; empty on timeout.
  Frames recv_from(const std::string& from, int timeout_ms = 5000) {
    const std::int64_t deadline = mono_ms() + timeout_ms;
    for (;;) {
      std::int64_t left = deadline - mono_ms();
      if (left <= 0) return {};
      zmq::pollitem_t item{router.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, std::chrono::milliseconds(left));
      if (!(item.revents & ZMQ_POLLIN)) continue;
      Frames frames;
      if (!zmq::recv_multipart(router, std::back_inserter(frames))) continue;
      if (!frames.empty() && view(frames[0]) == from) return frames;
    }
  }
  // A `link` message from the job, decoded (channel checked, routing id stripped).
  wire::Message recv_link(const std::string& job) {
    Frames f = recv_from(job);
    EXPECT_GE(f.size(), 3u);
    if (f.size() < 3) return {};
    EXPECT_EQ(str(f[1]), "link");
    f.erase(f.begin(), f.begin() + 2);
    auto d = session.decode(std::move(f));
    EXPECT_TRUE(d) << d.detail;
    return d ? std::move(*d.msg) : wire::Message{};
  }
  // Nothing from `from` within `ms`.
  bool quiet(const std::string& from, int ms = 200) { return recv_from(from, ms).empty(); }

  void send(const std::string& to, Frames frames) {
    frames.insert(frames.begin(), frame(to));
    ASSERT_TRUE(zmq::send_multipart(router, frames));
  }
  void send_link(const std::string& to, std::string_view msg_type, const json& content) {
    Frames ids;
    ids.push_back(frame("link"));
    send(to, session.build(std::move(ids), msg_type, content));
  }

  std::string url;
  zmq::socket_t router;
  wire::Session session;
};

// One rank's replies, signed as the rank signs them (every rank has the key).
wire::Session rank_session(const std::string& uuid) {
  auto o = keyed();
  o.session_id = uuid;
  return wire::Session(o);
}

class GatewayTest : public ::testing::Test {
 protected:
  static constexpr int kRanks = 3;

  GatewayTest() : controller(ctx) {
    for (int r = 0; r < kRanks; ++r) ranks.push_back({new_id(), "node" + std::to_string(r)});
  }
  ~GatewayTest() override {
    gw.reset();  // its heart thread and socket before the context
  }

  gateway::GatewayOptions options(int register_timeout_ms = 5000) {
    gateway::GatewayOptions o;
    o.url = controller.url;
    o.job_uuid = job;
    o.session = keyed();
    o.register_timeout_ms = register_timeout_ms;
    return o;
  }

  // register_job on a thread of its own while this one answers as the controller.
  std::vector<int> register_ok(json reply = {{"status", "ok"}, {"ids", {10, 11, 12}}, {"hb_period", 60000}}) {
    gw = std::make_unique<gateway::Gateway>(ctx, options());
    auto ids = std::async(std::launch::async, [&] { return gw->register_job(ranks); });
    request = controller.recv_link(job);
    controller.send_link(job, "pxf_register_reply", reply);
    return ids.get();
  }

  // Receives what is waiting on the link (as the fabric thread does after ZMQ_FD fired) until
  // the sink got `n` calls in all.
  void pump_until(std::size_t n, int timeout_ms = 5000) {
    const std::int64_t deadline = mono_ms() + timeout_ms;
    while (sink.count() < n && mono_ms() < deadline) {
      gw->fd_signalled();
      gw->poll_link(sink);
      if (sink.count() < n) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    ASSERT_EQ(sink.count(), n);
  }
  // Gives the link time to deliver anything else that was sent, and receives it.
  void settle() {
    for (int i = 0; i < 20; ++i) {
      gw->fd_signalled();
      gw->poll_link(sink);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  // A client's request for an engine, as the controller forwards it on `channel`: [ch, E, C, msg].
  Frames request_for(const std::string& channel, const std::string& engine_uuid, const std::string& msg_type) {
    Frames ids;
    ids.push_back(frame(channel));
    ids.push_back(frame(engine_uuid));
    ids.push_back(frame("client-1"));
    return controller.session.build(std::move(ids), msg_type, {{"code", "1"}});
  }

  // A broadcast as the controller sends it to a job: [bcast, C, msg] with targets of this job.
  Frames bcast(const std::string& orig, const json& targets, bool coalescing) {
    Frames ids;
    ids.push_back(frame("bcast"));
    ids.push_back(frame("client-1"));
    json md{{"targets", targets}, {"original_msg_id", orig}, {"is_coalescing", coalescing}, {"is_broadcast", true}};
    return controller.session.build(std::move(ids), "apply_request", json::object(), json::object(), md);
  }

  // A rank's coalescing reply as it hands it to the gateway: [pxf_part, key, uuid, msg].
  Frames part(int rank, const std::string& key, std::vector<std::string> buffers) {
    const std::string& uuid = ranks[rank].uuid;
    Frames route;
    route.push_back(frame(link::kPartChannel));
    route.push_back(frame(key));
    route.push_back(frame(uuid));
    Frames bufs;
    for (auto& b : buffers) bufs.push_back(frame(b));
    auto s = rank_session(uuid);
    json parent{{"msg_id", key + "_" + uuid}};
    return s.build(std::move(route), "apply_reply", {{"status", "ok"}, {"rank", rank}}, parent,
                   {{"engine", uuid}, {"status", "ok"}, {"is_coalescing", true}}, std::move(bufs));
  }

  json pair(int rank) const { return json::array({ranks[rank].uuid, 10 + rank}); }

  zmq::context_t ctx;
  FakeController controller;
  std::string job = new_id();
  std::vector<gateway::RankInfo> ranks;
  std::unique_ptr<gateway::Gateway> gw;
  FakeSink sink;
  wire::Message request;
};

TEST_F(GatewayTest, RegistersEveryRankAtOnce) {
  auto ids = register_ok();
  EXPECT_EQ(ids, (std::vector<int>{10, 11, 12}));
  EXPECT_EQ(request.msg_type(), "pxf_register_request");
  EXPECT_EQ(request.session(), job);
  ASSERT_EQ(request.content["engines"].size(), 3u);
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_EQ(request.content["engines"][r]["uuid"], ranks[r].uuid);
    EXPECT_EQ(request.content["engines"][r]["rank"], r);
    EXPECT_EQ(request.content["engines"][r]["id"], r);  // ids requested = MPI ranks
    EXPECT_EQ(request.content["hostnames"][r], ranks[r].hostname);
  }
  EXPECT_EQ(request.content["size"], 3);
  EXPECT_EQ(gw->size(), 3u);
  EXPECT_EQ(gw->engine_id(2), 12);
  EXPECT_EQ(gw->hb_period_ms(), 60000);
}

TEST_F(GatewayTest, RegistrationRefusedSaysWhy) {
  gw = std::make_unique<gateway::Gateway>(ctx, options());
  auto ids = std::async(std::launch::async, [&] { return gw->register_job(ranks); });
  controller.recv_link(job);
  controller.send_link(job, "pxf_register_reply", {{"status", "error"}, {"evalue", "engine ids 0-2 are taken"}});
  try {
    ids.get();
    FAIL() << "registration should have failed";
  } catch (const gateway::GatewayError& e) {
    EXPECT_NE(std::string(e.what()).find("registration refused by the controller: engine ids 0-2 are taken"),
              std::string::npos)
        << e.what();
  }
}

TEST_F(GatewayTest, RegistrationReplyWithAnotherKeyIsASignatureError) {
  FakeController other(ctx, "another-key");
  auto o = options();
  o.url = other.url;
  gw = std::make_unique<gateway::Gateway>(ctx, o);
  auto ids = std::async(std::launch::async, [&] { return gw->register_job(ranks); });
  EXPECT_FALSE(other.recv_from(job).empty());
  other.send_link(job, "pxf_register_reply", {{"status", "ok"}, {"ids", {0, 1, 2}}});
  try {
    ids.get();
    FAIL() << "registration should have failed";
  } catch (const gateway::GatewayError& e) {
    EXPECT_NE(std::string(e.what()).find("signature"), std::string::npos) << e.what();
  }
}

TEST_F(GatewayTest, RequestsGoToTheRankOfTheirEngine) {
  register_ok();
  controller.send(job, request_for("mux", ranks[1].uuid, "execute_request"));
  controller.send(job, request_for("control", ranks[2].uuid, "abort_request"));
  controller.send(job, request_for("task", ranks[0].uuid, "apply_request"));
  controller.send(job, request_for("mux", "not-an-engine-of-this-job", "execute_request"));  // dropped
  pump_until(3);
  settle();
  ASSERT_EQ(sink.to_ranks.size(), 3u);
  EXPECT_TRUE(sink.to_alls.empty());
  EXPECT_EQ(sink.to_ranks[0].first, 1);
  EXPECT_EQ(sink.to_ranks[1].first, 2);
  EXPECT_EQ(sink.to_ranks[2].first, 0);
  // Link format for the rank: [channel, E, C, <IDS|MSG>, ...], the controller's signature intact.
  auto f = strs(sink.to_ranks[0].second);
  ASSERT_GE(f.size(), 8u);
  EXPECT_EQ(f[0], "mux");
  EXPECT_EQ(f[1], ranks[1].uuid);
  EXPECT_EQ(f[2], "client-1");
  EXPECT_EQ(f[3], wire::kDelimiter);
  wire::Session rank1 = rank_session(ranks[1].uuid);
  Frames msg = std::move(sink.to_ranks[0].second);
  auto d = rank1.decode(std::move(msg));
  ASSERT_TRUE(d) << d.detail;
  EXPECT_EQ(d.msg->msg_type(), "execute_request");
  EXPECT_EQ(str(sink.to_ranks[1].second[0]), "control");
  EXPECT_EQ(str(sink.to_ranks[2].second[0]), "task");
}

TEST_F(GatewayTest, RankRepliesAndIopubGoOnTheLinkAsTheyAre) {
  register_ok();
  auto s = rank_session(ranks[2].uuid);
  Frames route;
  route.push_back(frame("mux"));
  route.push_back(frame(ranks[2].uuid));
  route.push_back(frame("client-1"));
  Frames reply = s.build(std::move(route), "execute_reply", {{"status", "ok"}});
  auto sent = strs(reply);
  gw->from_rank(std::move(reply), sink);
  Frames iopub;
  iopub.push_back(frame("iopub"));
  iopub.push_back(frame("engine.12.stdout"));
  gw->from_rank(s.build(std::move(iopub), "stream", {{"name", "stdout"}, {"text", "hi\n"}}), sink);

  Frames got = controller.recv_from(job);
  ASSERT_FALSE(got.empty());
  got.erase(got.begin());  // the ROUTER's routing id
  EXPECT_EQ(strs(got), sent);
  got = controller.recv_from(job);
  ASSERT_GE(got.size(), 3u);
  EXPECT_EQ(str(got[1]), "iopub");
  EXPECT_EQ(str(got[2]), "engine.12.stdout");
  EXPECT_TRUE(sink.count() == 0);
}

TEST_F(GatewayTest, ABroadcastGoesToEveryRankOnce) {
  register_ok();
  Frames b = bcast("orig-1", json::array({pair(0), pair(2)}), false);
  auto sent = strs(b);
  controller.send(job, std::move(b));
  pump_until(1);
  ASSERT_EQ(sink.to_alls.size(), 1u);
  EXPECT_EQ(strs(sink.to_alls[0]), sent);  // [bcast, C, msg] unchanged, signature intact
  EXPECT_TRUE(sink.to_ranks.empty());
}

TEST_F(GatewayTest, CoalescingRepliesLeaveAsOneMessageInTargetOrder) {
  register_ok();
  // Targets in the client's order (2, then 0); rank 1 is not targeted.
  controller.send(job, bcast("orig-2", json::array({pair(2), pair(0)}), true));
  pump_until(1);
  ASSERT_EQ(sink.to_alls.size(), 1u);

  gw->from_rank(part(0, "orig-2", {"b0-first", "b0-second"}), sink);  // arrives first
  gw->from_rank(part(1, "orig-2", {"b1"}), sink);                     // not a target: dropped
  gw->from_rank(part(1, "no-such-broadcast", {"x"}), sink);           // unknown: dropped
  EXPECT_TRUE(controller.quiet(job));
  gw->from_rank(part(2, "orig-2", {"b2"}), sink);

  Frames got = controller.recv_from(job);
  ASSERT_GE(got.size(), 4u);
  got.erase(got.begin());
  EXPECT_EQ(str(got[0]), "bcast_coalesced");
  EXPECT_EQ(str(got[1]), "client-1");
  got.erase(got.begin());
  auto d = controller.session.decode(std::move(got));  // signed by the gateway
  ASSERT_TRUE(d) << d.detail;
  auto& m = *d.msg;
  EXPECT_EQ(strs(m.identities), (std::vector<std::string>{"client-1"}));
  // header, parent and content of the last target's reply (rank 0), its metadata plus
  // broadcast_targets, every reply's buffers in target order.
  EXPECT_EQ(m.header["session"], ranks[0].uuid);
  EXPECT_EQ(m.parent["msg_id"], "orig-2_" + ranks[0].uuid);
  EXPECT_EQ(m.content["rank"], 0);
  EXPECT_EQ(m.metadata["engine"], ranks[0].uuid);
  EXPECT_EQ(m.metadata["broadcast_targets"], json::array({pair(2), pair(0)}));
  EXPECT_EQ(strs(m.buffers), (std::vector<std::string>{"b2", "b0-first", "b0-second"}));
  EXPECT_TRUE(controller.quiet(job));
  // A late duplicate of a part finds no broadcast.
  gw->from_rank(part(2, "orig-2", {"b2"}), sink);
  EXPECT_TRUE(controller.quiet(job));
}

TEST_F(GatewayTest, TargetsAreTheJobsOwnAndPlainUuidsGetTheirIds) {
  register_ok();
  // A uuid of another job is ignored; a target given as a bare uuid gets [uuid, id].
  controller.send(job, bcast("orig-3", json::array({json::array({"other-job-engine", 99}), ranks[1].uuid}), true));
  pump_until(1);
  gw->from_rank(part(1, "orig-3", {}), sink);
  Frames got = controller.recv_from(job);
  ASSERT_GE(got.size(), 3u);
  EXPECT_EQ(str(got[1]), "bcast_coalesced");
  got.erase(got.begin(), got.begin() + 2);
  auto d = controller.session.decode(std::move(got));
  ASSERT_TRUE(d) << d.detail;
  EXPECT_EQ(d.msg->metadata["broadcast_targets"], json::array({pair(1)}));
}

TEST_F(GatewayTest, ARankDownUnregistersItAndAbandonsItsBroadcasts) {
  register_ok();
  controller.send(job, bcast("orig-4", json::array({pair(0), pair(1)}), true));
  pump_until(1);
  gw->from_rank(part(0, "orig-4", {"b0"}), sink);
  Frames down;
  down.push_back(frame(link::kRankDownChannel));
  down.push_back(frame("1"));
  gw->from_rank(std::move(down), sink);
  auto m = controller.recv_link(job);
  EXPECT_EQ(m.msg_type(), "pxf_unregister");
  EXPECT_EQ(m.content["ids"], json::array({11}));
  EXPECT_EQ(m.content["reason"], "shutdown");
  // The controller failed that broadcast already (EngineError): no partial coalesced reply.
  EXPECT_TRUE(controller.quiet(job));
  EXPECT_TRUE(sink.ended.empty());

  // The last ranks going down end the job; a rank already down is not unregistered twice.
  for (const char* r : {"1", "0", "2"}) {
    Frames f;
    f.push_back(frame(link::kRankDownChannel));
    f.push_back(frame(r));
    gw->from_rank(std::move(f), sink);
  }
  EXPECT_EQ(controller.recv_link(job).content["ids"], json::array({10}));
  EXPECT_EQ(controller.recv_link(job).content["ids"], json::array({12}));
  ASSERT_EQ(sink.ended.size(), 1u);
  EXPECT_EQ(sink.ended[0], (std::pair<int, std::string>{0, "all engines shut down"}));
  gw->close("job exit");  // nothing left to unregister
  EXPECT_TRUE(controller.quiet(job));
}

TEST_F(GatewayTest, CloseUnregistersTheRanksStillRegistered) {
  register_ok();
  gw->unregister({2}, "rank 2 died");
  auto m = controller.recv_link(job);
  EXPECT_EQ(m.content, (json{{"ids", json::array({12})}, {"reason", "rank 2 died"}}));
  gw->close("job exit");
  m = controller.recv_link(job);
  EXPECT_EQ(m.msg_type(), "pxf_unregister");
  EXPECT_EQ(m.content, (json{{"ids", json::array({10, 11})}, {"reason", "job exit"}}));
}

TEST_F(GatewayTest, ShutdownFromTheControllerEndsTheJob) {
  register_ok();
  controller.send_link(job, "pxf_probe", json::object());  // nothing to do
  controller.send_link(job, "pxf_shutdown", {{"reason", "controller exit"}});
  pump_until(1);
  ASSERT_EQ(sink.ended.size(), 1u);
  EXPECT_EQ(sink.ended[0], (std::pair<int, std::string>{0, "pxf_shutdown controller exit"}));
  EXPECT_TRUE(sink.to_ranks.empty() && sink.to_alls.empty());
}

TEST_F(GatewayTest, LinkMessagesWithABadSignatureAreDropped) {
  register_ok();
  FakeController stranger(ctx, "wrong-key");
  Frames ids;
  ids.push_back(frame("link"));
  Frames forged = stranger.session.build(std::move(ids), "pxf_shutdown", {{"reason", "forged"}});
  controller.send(job, std::move(forged));
  controller.send(job, request_for("mux", ranks[0].uuid, "execute_request"));
  pump_until(1);
  settle();
  EXPECT_TRUE(sink.ended.empty());
  EXPECT_EQ(sink.to_ranks.size(), 1u);
}

TEST_F(GatewayTest, HeartbeatsOnTheirOwnConnectionAndALostController) {
  auto o = options();
  o.max_heartbeat_misses = 3;
  gw = std::make_unique<gateway::Gateway>(ctx, o);
  auto ids = std::async(std::launch::async, [&] { return gw->register_job(ranks); });
  controller.recv_link(job);
  controller.send_link(job, "pxf_register_reply", {{"status", "ok"}, {"ids", {0, 1, 2}}, {"hb_period", 100}});
  ASSERT_EQ(ids.get().size(), 3u);
  // The heart's own DEALER: routing id "<job>/hb", pxf_heartbeat on `link`; answered for a while.
  const std::string hb = job + "/hb";
  std::uint64_t last_seq = 0;
  for (int i = 0; i < 5; ++i) {
    Frames f = controller.recv_from(hb);
    ASSERT_GE(f.size(), 3u);
    EXPECT_EQ(str(f[1]), "link");
    f.erase(f.begin(), f.begin() + 2);
    auto d = controller.session.decode(std::move(f));
    ASSERT_TRUE(d) << d.detail;
    EXPECT_EQ(d.msg->msg_type(), "pxf_heartbeat");
    last_seq = d.msg->content["seq"].get<std::uint64_t>();
    controller.send_link(hb, "pxf_heartbeat_reply", {{"seq", last_seq}});
    gw->tick(sink);
  }
  EXPECT_GE(last_seq, 5u);
  EXPECT_TRUE(sink.ended.empty());
  // Unanswered: after max_heartbeat_misses beats and as many periods, tick() ends the job.
  const std::int64_t deadline = mono_ms() + 5000;
  while (sink.ended.empty() && mono_ms() < deadline) {
    gw->tick(sink);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(sink.ended.size(), 1u);
  EXPECT_EQ(sink.ended[0], (std::pair<int, std::string>{1, "lost the controller"}));
}

TEST(GatewayBcastKey, OriginalMsgIdElseTheHeaders) {
  EXPECT_EQ(gateway::bcast_key({{"msg_id", "h"}}, {{"original_msg_id", "o"}}), "o");
  EXPECT_EQ(gateway::bcast_key({{"msg_id", "h"}}, {{"original_msg_id", ""}}), "h");
  EXPECT_EQ(gateway::bcast_key({{"msg_id", "h"}}, json::object()), "h");
}

}  // namespace
