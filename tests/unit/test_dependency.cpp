// Dependency evaluation as ipyparallel's Dependency.check/unreachable (protocol §7.4).
#include "controller/dependency.hpp"

#include <gtest/gtest.h>

using namespace pxf::controller;
using nlohmann::json;

namespace {
TaskKey k(const char* id) { return task_key(id); }

struct Fixture : ::testing::Test {
  TaskOutcomes o;
  void SetUp() override {
    o.seen(k("pending"));
    o.finish(k("ok0"), true, 0);
    o.finish(k("ok1"), true, 1);
    o.finish(k("bad0"), false, 0);
    o.finish(k("lost"), false, -1);  // failed by the scheduler, never ran
  }
  Dependency dep(json j) { return Dependency::parse(j, false); }
};
}  // namespace

TEST_F(Fixture, ParseForms) {
  auto d = dep(json::array({"ok0", "ok1", "ok0"}));
  EXPECT_EQ(d.ids.size(), 2u);  // a set
  EXPECT_TRUE(d.all && d.success && !d.failure);
  d = dep("ok0");
  EXPECT_EQ(d.ids, std::vector<TaskKey>{k("ok0")});
  d = dep({{"dependencies", {"bad0"}}, {"all", false}, {"success", false}, {"failure", true}});
  EXPECT_FALSE(d.all);
  EXPECT_FALSE(d.success);
  EXPECT_TRUE(d.failure);
  EXPECT_TRUE(dep(json()).empty());
  EXPECT_TRUE(dep(json::object()).empty());
  EXPECT_TRUE(Dependency::parse(false, true).empty());  // `after` is read only when truthy
  EXPECT_TRUE(Dependency::parse(0, true).empty());
}

TEST_F(Fixture, ParseErrorsAreTheStockExceptions) {
  try {
    dep(json::array({"ok0", 5}));
    FAIL();
  } catch (const DependencyError& e) {
    EXPECT_EQ(e.ename, "TypeError");
    EXPECT_STREQ(e.what(), "invalid dependency type: <class 'int'>");
  }
  try {
    dep({{"dependencies", {"ok0"}}, {"success", false}, {"failure", false}});
    FAIL();
  } catch (const DependencyError& e) {
    EXPECT_EQ(e.ename, "ValueError");
  }
  EXPECT_THROW(dep(5), DependencyError);
  EXPECT_THROW(Dependency::parse(true, true), DependencyError);
}

TEST_F(Fixture, EmptyIsMetAndNeverUnreachable) {
  Dependency d;
  EXPECT_TRUE(d.met(o));
  EXPECT_TRUE(d.met_on(o, 3));
  EXPECT_FALSE(d.unreachable(o));
}

TEST_F(Fixture, AllSuccess) {
  auto d = dep(json::array({"ok0", "ok1"}));
  EXPECT_TRUE(d.met(o));
  EXPECT_FALSE(d.unreachable(o));
  d = dep(json::array({"ok0", "pending"}));
  EXPECT_FALSE(d.met(o));
  EXPECT_FALSE(d.unreachable(o));
  d = dep(json::array({"ok0", "bad0", "pending"}));
  EXPECT_FALSE(d.met(o));
  EXPECT_TRUE(d.unreachable(o));  // one failure is enough to make `all` impossible
}

TEST_F(Fixture, AnySuccess) {
  auto d = dep({{"dependencies", {"bad0", "pending"}}, {"all", false}});
  EXPECT_FALSE(d.met(o));
  EXPECT_FALSE(d.unreachable(o));
  d = dep({{"dependencies", {"bad0", "ok1"}}, {"all", false}});
  EXPECT_TRUE(d.met(o));
  d = dep({{"dependencies", {"bad0", "lost"}}, {"all", false}});
  EXPECT_TRUE(d.unreachable(o));  // every one failed
}

TEST_F(Fixture, FailureFlags) {
  auto only_failure = dep({{"dependencies", {"bad0", "lost"}}, {"success", false}, {"failure", true}});
  EXPECT_TRUE(only_failure.met(o));
  only_failure = dep({{"dependencies", {"bad0", "ok0"}}, {"success", false}, {"failure", true}});
  EXPECT_FALSE(only_failure.met(o));
  EXPECT_TRUE(only_failure.unreachable(o));  // ok0 succeeded
  auto either = dep({{"dependencies", {"bad0", "ok0"}}, {"success", true}, {"failure", true}});
  EXPECT_TRUE(either.met(o));
  EXPECT_FALSE(either.unreachable(o));
}

TEST_F(Fixture, FollowIsPerEngine) {
  auto d = dep(json::array({"ok0"}));
  EXPECT_TRUE(d.met_on(o, 0));
  EXPECT_FALSE(d.met_on(o, 1));
  d = dep(json::array({"ok0", "ok1"}));
  EXPECT_TRUE(d.met(o));         // globally met ...
  EXPECT_FALSE(d.met_on(o, 0));  // ... but on no single engine
  EXPECT_FALSE(d.met_on(o, 1));
  EXPECT_EQ(d.destinations(o).size(), 2u);
  auto any = dep({{"dependencies", {"ok0", "ok1"}}, {"all", false}});
  EXPECT_TRUE(any.met_on(o, 0));
  EXPECT_TRUE(any.met_on(o, 1));
  EXPECT_FALSE(any.met_on(o, 2));
}

TEST_F(Fixture, PruneMet) {
  auto d = dep(json::array({"ok0", "pending", "bad0"}));
  d.prune_met(o);
  EXPECT_EQ(d.ids.size(), 2u);
  EXPECT_FALSE(d.contains(k("ok0")));
  auto f = dep({{"dependencies", {"ok0", "bad0"}}, {"success", false}, {"failure", true}});
  f.prune_met(o);
  EXPECT_EQ(f.ids, std::vector<TaskKey>{k("ok0")});
}

TEST_F(Fixture, UnknownIdsAreNeitherMetNorUnreachable) {
  auto d = dep(json::array({"never-seen"}));
  EXPECT_FALSE(o.known(k("never-seen")));
  EXPECT_FALSE(d.met(o));
  EXPECT_FALSE(d.unreachable(o));
  EXPECT_TRUE(o.known(k("pending")));
  EXPECT_FALSE(o.done(k("pending")));
  EXPECT_TRUE(o.done(k("bad0")));
}
