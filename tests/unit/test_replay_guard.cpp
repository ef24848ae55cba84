// ReplayGuard: a bounded memory of accepted signatures (jupyter_client's digest_history).
#include "wire/replay_guard.hpp"

#include <gtest/gtest.h>

#include <string>
#include <type_traits>
#include <utility>

namespace {

using pxf::wire::ReplayGuard;

TEST(ReplayGuard, RejectsASignatureAlreadyAccepted) {
  ReplayGuard g(8);
  EXPECT_FALSE(g.seen("aa"));
  EXPECT_TRUE(g.accept("aa"));
  EXPECT_TRUE(g.seen("aa"));
  EXPECT_FALSE(g.accept("aa"));
  EXPECT_TRUE(g.accept("bb"));
  EXPECT_EQ(g.size(), 2u);
}

TEST(ReplayGuard, DefaultCapacityMatchesJupyterClient) { EXPECT_EQ(ReplayGuard().capacity(), 65536u); }

TEST(ReplayGuard, ForgetsOldestPastCapacity) {
  ReplayGuard g(3);
  for (const char* s : {"a", "b", "c", "d"}) EXPECT_TRUE(g.accept(s));
  EXPECT_EQ(g.size(), 3u);
  EXPECT_FALSE(g.seen("a"));  // oldest forgotten
  EXPECT_TRUE(g.seen("b"));
  EXPECT_TRUE(g.seen("d"));
  EXPECT_TRUE(g.accept("a"));  // accepted again once forgotten...
  EXPECT_FALSE(g.seen("b"));   // ...which pushes out the next oldest
  EXPECT_TRUE(g.seen("c"));
}

TEST(ReplayGuard, RejectedDuplicateDoesNotRefreshAge) {
  ReplayGuard g(2);
  EXPECT_TRUE(g.accept("a"));
  EXPECT_TRUE(g.accept("b"));
  EXPECT_FALSE(g.accept("a"));  // records nothing, so "a" stays the oldest
  EXPECT_TRUE(g.accept("c"));
  EXPECT_FALSE(g.seen("a"));
  EXPECT_TRUE(g.seen("b"));
  EXPECT_EQ(g.size(), 2u);
}

TEST(ReplayGuard, StaysBoundedAtFullCapacity) {
  ReplayGuard g;  // 65,536 as in jupyter_client
  for (std::size_t i = 0; i <= g.capacity(); ++i) ASSERT_TRUE(g.accept(std::to_string(i)));
  EXPECT_EQ(g.size(), g.capacity());
  EXPECT_FALSE(g.seen("0"));
  EXPECT_TRUE(g.seen("1"));
  EXPECT_FALSE(g.accept(std::to_string(g.capacity())));
}

TEST(ReplayGuard, MovedGuardKeepsItsMemoryAndOrder) {
  ReplayGuard a(2);
  EXPECT_TRUE(a.accept("x"));
  EXPECT_TRUE(a.accept("y"));
  ReplayGuard b(std::move(a));
  EXPECT_FALSE(b.accept("y"));
  EXPECT_TRUE(b.accept("z"));  // evicts "x" through the moved age list
  EXPECT_FALSE(b.seen("x"));
  EXPECT_TRUE(b.seen("y"));
  EXPECT_EQ(b.size(), 2u);
  ReplayGuard c = b;  // fingerprints by value: copies are independent
  EXPECT_TRUE(c.accept("w"));
  EXPECT_TRUE(b.accept("w"));
}

TEST(ReplayGuard, ZeroCapacityDisablesTheGuard) {
  ReplayGuard g(0);
  EXPECT_TRUE(g.accept("a"));
  EXPECT_TRUE(g.accept("a"));
  EXPECT_FALSE(g.seen("a"));
  EXPECT_EQ(g.size(), 0u);
}

TEST(ReplayGuard, ComparesWholeBinarySignatures) {
  ReplayGuard g(4);
  EXPECT_TRUE(g.accept(std::string("a\0b", 3)));
  EXPECT_TRUE(g.accept(std::string("a\0c", 3)));  // not cut at the NUL
  EXPECT_TRUE(g.accept("a"));
  EXPECT_FALSE(g.accept(std::string("a\0b", 3)));
}

}  // namespace
