// Engine ids on request (EngineTable::allocate_id): a requested id is given whenever no live
// engine holds it, as stock's hub does, so a restarted MPI job (pxcluster restart) gets the ids
// of the job before it; ids nobody asked for still count up and are never handed out twice.
#include "controller/engines.hpp"

#include <gtest/gtest.h>

using namespace pxf::controller;

namespace {
Engine& registered(EngineTable& t, int requested, const std::string& uuid) {
  Engine& e = t.add(t.allocate_id(requested), uuid);
  t.mark_registered(e);
  return e;
}
}  // namespace

TEST(EngineIds, RequestedIdOfAnEngineGoneIsGivenAgain) {
  EngineTable t;
  for (int r = 0; r < 4; ++r) registered(t, r, "old" + std::to_string(r));
  for (int r = 0; r < 4; ++r) t.remove(r);
  for (int r = 0; r < 4; ++r) EXPECT_EQ(registered(t, r, "new" + std::to_string(r)).id, r);
  EXPECT_EQ(t.history(), (std::vector<int>{0, 1, 2, 3}));
}

TEST(EngineIds, RequestedIdHeldByALiveEngineIsNotGiven) {
  EngineTable t;
  registered(t, 0, "a");
  EXPECT_EQ(t.allocate_id(0), 1);
  EXPECT_FALSE(t.id_free(0));
}

TEST(EngineIds, PendingEngineHoldsItsId) {
  EngineTable t;
  t.add(t.allocate_id(2), "pending");  // no heartbeat yet
  EXPECT_FALSE(t.id_free(2));
  EXPECT_NE(t.allocate_id(2), 2);
}

TEST(EngineIds, UnrequestedIdsAreNeverReused) {
  EngineTable t;
  registered(t, -1, "a");  // 0
  registered(t, -1, "b");  // 1
  t.remove(0);
  t.remove(1);
  EXPECT_EQ(registered(t, -1, "c").id, 2);
  EXPECT_TRUE(t.id_free(0));
  EXPECT_EQ(t.max_used_id(), 2);
}

TEST(EngineIds, RetiredCompletedListIsForgottenWhenTheIdComesBack) {
  EngineTable t;
  registered(t, 0, "old").completed.push_back("m1");
  t.remove(0);
  ASSERT_NE(t.retired_completed(0), nullptr);
  registered(t, 0, "new");
  EXPECT_EQ(t.retired_completed(0), nullptr);
}
