// Hub bookkeeping that stock parity depends on: the ids and completed lists queue_status reports
// after engines went away (EngineTable), and ipyparallel 9.1's task label (TaskRecords::to_json).
#include "controller/engines.hpp"
#include "controller/records.hpp"

#include <gtest/gtest.h>

#include <algorithm>

using namespace pxf::controller;
using nlohmann::json;

namespace {
Engine& registered(EngineTable& t, int id, const std::string& uuid) {
  Engine& e = t.add(t.allocate_id(id), uuid);
  t.mark_registered(e);
  return e;
}

TaskRecord record(const std::string& metadata) {
  TaskRecord r;
  r.header = R"({"msg_id": "m1", "msg_type": "apply_request", "date": "2026-01-01T00:00:00Z", "session": "s"})";
  r.metadata = metadata;
  r.queue = "task";
  return r;
}
}  // namespace

TEST(EngineTable, NoEnginesMeansNoIds) {
  EngineTable t;
  EXPECT_TRUE(t.history().empty());
  EXPECT_EQ(t.retired_completed(0), nullptr);
}

TEST(EngineTable, RemovedEngineKeepsItsIdAndCompletedList) {
  EngineTable t;
  Engine& e0 = registered(t, -1, "u0");
  registered(t, -1, "u1");
  e0.completed.push_back("a");
  e0.completed.push_back("b");
  t.remove(0);
  t.remove(1);
  EXPECT_EQ(t.history(), (std::vector<int>{0, 1}));
  EXPECT_EQ(t.by_id(0), nullptr);
  ASSERT_NE(t.retired_completed(0), nullptr);
  EXPECT_EQ(t.retired_completed(0)->list(), (std::vector<std::string>{"a", "b"}));
  ASSERT_NE(t.retired_completed(1), nullptr);
  EXPECT_EQ(t.retired_completed(1)->size(), 0u);
}

TEST(EngineTable, PendingEngineRemovedLeavesNothing) {
  EngineTable t;
  t.add(t.allocate_id(-1), "u0");  // never registered (no heartbeat)
  t.remove(0);
  EXPECT_TRUE(t.history().empty());
  EXPECT_EQ(t.retired_completed(0), nullptr);
  EXPECT_EQ(t.pending_count(), 0u);
}

TEST(TaskRecordLabel, KeptFromTheRequestMetadata) {
  json rec = TaskRecords::to_json("m1", record(R"({"label": "mylabel", "after": []})"));
  EXPECT_EQ(rec["label"], "mylabel");
  EXPECT_EQ(rec["metadata"]["label"], "mylabel");
  // A 9.x client sends label None when none is set: the record says so.
  json none = TaskRecords::to_json("m1", record(R"({"label": null})"));
  ASSERT_TRUE(none.contains("label"));
  EXPECT_TRUE(none["label"].is_null());
}

TEST(TaskRecordLabel, AbsentWithoutOneSoRecordsKeepStockKeys) {
  json rec = TaskRecords::to_json("m1", record(R"({"after": []})"));
  EXPECT_FALSE(rec.contains("label"));
  // ...but `label` is a key db_request accepts (`keys=['label']`).
  auto& keys = TaskRecords::keys();
  EXPECT_NE(std::find(keys.begin(), keys.end(), "label"), keys.end());
}
