// The load-balanced scheduler (controller/scheduler.hpp) without a controller: tasks are
// handed to TaskScheduler directly, engines and the client are DEALERs on inproc sockets.
// Stock TaskScheduler semantics (protocol §7): queue order, parking on dependencies, retries
// with the failed engine left out, unmet @depend, timeouts, tasks stranded on a lost engine.
#include "controller/event_loop.hpp"
#include "controller/job_link.hpp"
#include "controller/scheduler.hpp"
#include "util/clock.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <map>

using namespace pxf;
using namespace pxf::controller;

namespace {

std::atomic<int> g_fixture{0};

// One received message: who sent it (the ROUTER's next identity, if any) and its parts.
struct Got {
  std::string route;  // engine: the client id; client: the engine uuid ("" from the scheduler)
  json header, parent, metadata, content;
};

struct Scheduler : ::testing::Test {
  zmq::context_t ctx;
  wire::Session session{[] {
    wire::SessionOptions o;
    o.key = "test-key";
    return o;
  }()};
  EventLoop loop;
  Options opts;
  EngineTable engines;
  TaskRecords records;
  zmq::socket_t task_in{ctx, zmq::socket_type::router}, task_out{ctx, zmq::socket_type::router};
  zmq::socket_t fabric, fabric_monitor, mux_out, control_out;  // unused: stock engines only
  zmq::socket_t client{ctx, zmq::socket_type::dealer};
  std::map<std::string, zmq::socket_t> engine_socks;  // uuid -> the engine's DEALER
  std::string ep_in, ep_out;
  std::unique_ptr<JobLink> link;
  std::unique_ptr<TaskScheduler> sched;

  void make(const std::string& scheme = "lru", int hwm = 1) {
    loop.set_session(&session);
    int n = ++g_fixture;
    ep_in = "inproc://task_in" + std::to_string(n);
    ep_out = "inproc://task_out" + std::to_string(n);
    task_in.set(zmq::sockopt::router_mandatory, 1);
    task_out.set(zmq::sockopt::router_mandatory, 1);
    task_in.bind(ep_in);
    task_out.bind(ep_out);
    client.set(zmq::sockopt::routing_id, "client");
    client.connect(ep_in);
    link = std::make_unique<JobLink>(loop, engines, opts, fabric, fabric_monitor, mux_out, control_out, task_out);
    sched = std::make_unique<TaskScheduler>(loop, engines, records, *link, task_in, scheme, hwm);
  }

  int add_engine(const std::string& uuid, int requested_id = -1) {
    zmq::socket_t s(ctx, zmq::socket_type::dealer);
    s.set(zmq::sockopt::routing_id, uuid);
    s.connect(ep_out);
    engine_socks.emplace(uuid, std::move(s));
    int id = engines.allocate_id(requested_id);
    Engine& e = engines.add(id, uuid);
    engines.mark_registered(e);
    sched->add_engine(id);
    sched->settle();
    return id;
  }

  // Submits a task as a client would; returns its msg_id.
  std::string submit(const std::string& msg_id, const json& metadata = json::object()) {
    json header = session.make_header("apply_request");
    header["msg_id"] = msg_id;
    Frames ids;
    ids.push_back(wire::frame("client"));
    sched->on_task_submit(session.encode(std::move(ids), header, json::object(), metadata, json::object()));
    return msg_id;
  }

  // An engine's answer to `msg_id`.
  void reply(const std::string& uuid, const std::string& msg_id, const std::string& status = "ok",
             bool deps_met = true) {
    json parent = session.make_header("apply_request");
    parent["msg_id"] = msg_id;
    Frames ids;
    ids.push_back(wire::frame(uuid));
    ids.push_back(wire::frame("client"));
    json md = {{"status", status}, {"dependencies_met", deps_met}, {"engine", uuid}};
    sched->on_task_reply(
        session.encode(std::move(ids), session.make_header("apply_reply"), parent, md, {{"status", status}}));
  }

  static std::optional<Got> recv(zmq::socket_t& s, int timeout_ms = 200) {
    zmq::pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, std::chrono::milliseconds(timeout_ms));
    if (!(item.revents & ZMQ_POLLIN)) return std::nullopt;
    Frames f;
    if (!zmq::recv_multipart(s, std::back_inserter(f), zmq::recv_flags::dontwait)) return std::nullopt;
    std::size_t d = 0;
    while (d < f.size() && wire::view(f[d]) != wire::kDelimiter) ++d;
    if (d + 6 > f.size()) return std::nullopt;
    Got g;
    if (d > 0) g.route = std::string(wire::view(f[0]));
    auto parse = [&](std::size_t i) {
      auto v = wire::view(f[i]);
      return json::parse(v.begin(), v.end());
    };
    g.header = parse(d + 2);
    g.parent = parse(d + 3);
    g.metadata = parse(d + 4);
    g.content = parse(d + 5);
    return g;
  }
  // The msg_id of the task engine `uuid` received next, or "" if none.
  std::string task_on(const std::string& uuid) {
    auto g = recv(engine_socks.at(uuid));
    return g ? g->header.value("msg_id", "") : "";
  }
  // The next reply the client received.
  std::optional<Got> client_reply(int timeout_ms = 200) { return recv(client, timeout_ms); }
};

}  // namespace

TEST_F(Scheduler, WaitingTasksRunInSubmissionOrder) {
  make("lru", 1);
  add_engine("e0");
  submit("a");
  submit("b");
  submit("c");
  EXPECT_EQ(task_on("e0"), "a");
  EXPECT_EQ(task_on("e0"), "");  // HWM 1: the engine is full
  EXPECT_EQ(sched->waiting_count(), 2u);
  EXPECT_EQ(sched->waiting_ids(), (std::vector<std::string>{"b", "c"}));
  reply("e0", "a");
  auto r = client_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->parent["msg_id"], "a");
  EXPECT_EQ(r->route, "e0");
  EXPECT_EQ(task_on("e0"), "b");
  reply("e0", "b");
  EXPECT_EQ(task_on("e0"), "c");
  reply("e0", "c");
  EXPECT_TRUE(sched->idle());
  EXPECT_EQ(sched->tasks_finished(), 3u);
}

TEST_F(Scheduler, TasksWaitForAnEngine) {
  make();
  submit("a");
  EXPECT_EQ(sched->waiting_count(), 1u);
  add_engine("e0");
  EXPECT_EQ(task_on("e0"), "a");
  EXPECT_EQ(sched->waiting_count(), 0u);
  EXPECT_EQ(sched->in_flight_count(), 1u);
}

TEST_F(Scheduler, ParkedUntilItsDependencyFinishes) {
  make("lru", 0);
  add_engine("e0");
  submit("a");
  submit("b", {{"after", {"a"}}});
  EXPECT_EQ(task_on("e0"), "a");
  EXPECT_EQ(task_on("e0"), "");  // HWM unlimited: b is blocked, not queued behind a
  EXPECT_EQ(sched->graph_count(), 1u);
  reply("e0", "a");
  EXPECT_EQ(task_on("e0"), "b");
  EXPECT_EQ(sched->graph_count(), 0u);
}

TEST_F(Scheduler, AFailedDependencyMakesItsDependentImpossible) {
  make("lru", 0);
  add_engine("e0");
  submit("a");
  submit("b", {{"after", {"a"}}});
  EXPECT_EQ(task_on("e0"), "a");
  reply("e0", "a", "error");
  auto ra = client_reply();
  ASSERT_TRUE(ra);
  EXPECT_EQ(ra->parent["msg_id"], "a");
  auto rb = client_reply();
  ASSERT_TRUE(rb);
  EXPECT_EQ(rb->parent["msg_id"], "b");
  EXPECT_EQ(rb->route, "");  // the scheduler's answer: no engine frame
  EXPECT_EQ(rb->content["ename"], "ImpossibleDependency");
  EXPECT_TRUE(sched->idle());
}

TEST_F(Scheduler, UnknownDependencyIsInvalid) {
  make();
  add_engine("e0");
  submit("a", {{"after", {"never-submitted"}}});
  auto r = client_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->content["ename"], "InvalidDependency");
  EXPECT_EQ(task_on("e0"), "");
}

TEST_F(Scheduler, BadMetadataIsAnsweredNotDropped) {
  make();
  add_engine("e0");
  submit("a", {{"retries", "three"}});
  auto r = client_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->content["ename"], "TypeError");
}

TEST_F(Scheduler, AFailureWithRetriesLeftGoesToAnotherEngine) {
  make("lru", 1);
  add_engine("e0");
  add_engine("e1");
  submit("a", {{"retries", 1}});
  std::string first = task_on("e0") == "a" ? "e0" : "e1";
  std::string second = first == "e0" ? "e1" : "e0";
  if (first == "e1") {
    EXPECT_EQ(task_on("e1"), "a");
  }
  reply(first, "a", "error");
  EXPECT_FALSE(client_reply(50));  // not answered: retried
  EXPECT_EQ(task_on(second), "a");
  reply(second, "a", "error");  // no retries left: the failure goes to the client
  auto r = client_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->route, second);
  EXPECT_EQ(r->metadata["status"], "error");
}

// A restarted job's engines take the old ids; a task that failed on the old engine 0 may run on
// the new one (stock blacklists by uuid), and a 1-engine job's retried task does not wait forever.
TEST_F(Scheduler, ARetriedTaskMayRunOnTheNewEngineThatTookTheSameId) {
  make("lru", 1);
  int id = add_engine("old-e0");
  submit("a", {{"retries", 1}});
  EXPECT_EQ(task_on("old-e0"), "a");
  reply("old-e0", "a", "error");
  EXPECT_FALSE(client_reply(50));    // retried: waits for an engine it has not failed on
  EXPECT_EQ(task_on("old-e0"), "");  // not the engine it failed on
  EXPECT_EQ(sched->waiting_ids(), std::vector<std::string>{"a"});
  sched->remove_engine(id);
  engines.remove(id);
  ASSERT_EQ(add_engine("new-e0", id), id);  // the restarted job asks for the same id
  EXPECT_EQ(task_on("new-e0"), "a");
  reply("new-e0", "a");
  auto r = client_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->metadata["status"], "ok");
}

TEST_F(Scheduler, UnmetDependenciesOnEveryTargetIsImpossible) {
  make("lru", 1);
  add_engine("e0");
  add_engine("e1");
  submit("a", {{"targets", {"e0"}}});
  EXPECT_EQ(task_on("e0"), "a");
  EXPECT_EQ(task_on("e1"), "");
  reply("e0", "a", "ok", /*deps_met=*/false);  // @depend/@require not met there: blacklisted
  auto r = client_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->content["ename"], "ImpossibleDependency");
}

TEST_F(Scheduler, TimesOutWhileWaiting) {
  make();
  submit("a", {{"timeout", 0.5}});
  submit("b");
  auto deadline = sched->next_timeout();
  ASSERT_TRUE(deadline);
  EXPECT_GE(*deadline, mono_ms() + 400);
  sched->on_timeouts(*deadline - 1);
  EXPECT_FALSE(client_reply(50));
  sched->on_timeouts(*deadline);
  auto r = client_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->parent["msg_id"], "a");
  EXPECT_EQ(r->content["ename"], "TaskTimeout");
  EXPECT_EQ(sched->waiting_ids(), std::vector<std::string>{"b"});
  EXPECT_FALSE(sched->next_timeout());
}

TEST_F(Scheduler, ALostEnginesTasksFailWithEngineError) {
  make("lru", 1);
  int id = add_engine("e0");
  submit("a");
  EXPECT_EQ(task_on("e0"), "a");
  std::vector<std::string> stranded(engines.by_id(id)->tasks.begin(), engines.by_id(id)->tasks.end());
  std::uint64_t engines_serial_gone = engines.by_id(id)->serial;
  sched->remove_engine(id);
  engines.remove(id);
  sched->strand_tasks(id, "e0", engines_serial_gone, stranded);
  sched->settle();
  auto r = client_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->route, "e0");
  EXPECT_EQ(r->content["ename"], "EngineError");
  EXPECT_TRUE(sched->idle());
}

TEST_F(Scheduler, AReplyFromTheWrongEngineIsNotTheAnswer) {
  make("lru", 1);
  add_engine("e0");
  add_engine("e1");
  submit("a", {{"targets", {"e0"}}});
  EXPECT_EQ(task_on("e0"), "a");
  reply("e1", "a");
  EXPECT_FALSE(client_reply(50));
  EXPECT_EQ(loop.counters()["task.unexpected_reply"], 1u);
  EXPECT_EQ(sched->in_flight_count(), 1u);
}
