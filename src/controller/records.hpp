#pragma once
// Task records: what the hub remembers of each direct and load-balanced request, so that
// result_request (rc.get_result from any client), history_request, db_request, purge_request,
// resubmit_request and queue_status work (protocol §4.4, §4.5).
// Bounded like the stock in-memory DictDB: past the record limit, the oldest finished records
// are culled (cull_fraction of the limit at a time); past the size limit (request and result
// buffer bytes), the oldest finished ones go until the total is under (1 - cull_fraction) of it.
// Unlike DictDB, a record still pending is never culled.
// With `keep` off (ipcontroller --nodb, stock's NoDB) nothing of a task is stored: a pending
// task has a bare record (for purge and status queries) and a finished one leaves only its
// msg_id, as stock's hub keeps its set of completed ids; record queries answer NoData.
#include "wire/message.hpp"

#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace pxf::controller {

class BufferCopier;

using wire::json;

struct RecordLimits {
  std::size_t record_limit = 1024;                // DictDB.record_limit
  std::size_t size_limit = std::size_t{1} << 30;  // DictDB.size_limit (bytes)
  double cull_fraction = 0.1;                     // DictDB.cull_fraction
  bool keep = true;                               // false: NoDB (--nodb)
};

struct TaskRecord {
  std::string header;    // the request's header, JSON as received (parsed on demand)
  std::string metadata;  // the request's metadata, JSON as received
  std::string content;   // the request's content, JSON as received
  json header_json() const;
  wire::Frames buffers;     // the request's buffers (shared with the message, not copied)
  std::string queue;        // "mux" or "task"
  std::string engine_uuid;  // "" until assigned
  bool completed = false;
  std::string result_header, result_metadata, result_content;  // reply JSON, as received
  wire::Frames result_buffers;                                 // shares the reply's frames
  std::string received;                                        // ISO date the reply passed
  std::string resubmitted;                                     // msg_id of its resubmission, "" if none
  json execute_input, execute_result, error;                   // from iopub (null when none)
  std::string out, err;                                        // stdout / stderr from iopub
  std::size_t bytes = 0;                                       // buffer bytes held (request and result)
  std::uint64_t buffers_gen = 0, result_gen = 0;               // bumped when buffers / result_buffers are replaced
};

class TaskRecords {
 public:
  explicit TaskRecords(RecordLimits limits = {}) : limits_(limits) {}
  // Buffers of kCopyAsyncBytes or more are shared at first and replaced by a private copy made
  // on `copier`'s thread (adopt_copy), so records do not pin received frames (buffer_copier.hpp).
  static constexpr std::size_t kCopyAsyncBytes = 1 << 20;
  void set_copier(BufferCopier* copier) { copier_ = copier; }
  // Swaps in a copy made by the copier; false if the record or that buffer is gone or replaced.
  bool adopt_copy(const std::string& msg_id, bool result, std::size_t index, std::uint64_t gen, zmq::message_t&& copy);

  // A new record of `request` (its JSON frames and buffers are copied, large buffers shared).
  TaskRecord& add(const std::string& msg_id, wire::Message& request, const char* queue);
  TaskRecord* find(const std::string& msg_id);
  // Stores the reply (buffers shared, not copied) and culls if over a limit.
  void complete(const std::string& msg_id, wire::Message& reply);
  void complete(const std::string& msg_id, std::string header, std::string metadata, std::string content,
                const std::string& engine_uuid);
  // Folds an iopub message into its parent's record.
  void add_output(const std::string& parent_id, const std::string& msg_type, const json& content);

  // Drops completed records: all of them, those in `ids`, or those that ran on `engine_uuid`.
  std::size_t drop_completed();
  std::size_t drop(const std::vector<std::string>& ids);
  std::size_t drop_engine(const std::string& engine_uuid);

  // msg_ids of every record, in submission order.
  std::vector<std::string> history() const;
  // Every (msg_id, record), in submission order.
  template <class F>
  void for_each(F&& f) {
    for (auto& id : order_)
      if (auto it = records_.find(id); it != records_.end()) f(id, it->second);
  }
  // NoDB: finished tasks, by msg_id only.
  bool finished_unkept(const std::string& msg_id) const { return unkept_.count(msg_id) != 0; }
  bool keeps() const { return limits_.keep; }
  std::size_t size() const { return records_.size(); }
  std::size_t bytes() const { return bytes_; }
  const RecordLimits& limits() const { return limits_; }
  // result_request's per-message entry: header, metadata, result_*, received, io.
  static json extract(const TaskRecord& r);
  // The record as DictDB holds it (every key but the buffers), for db_request; dates as ISO.
  static json to_json(const std::string& msg_id, const TaskRecord& r);
  static const std::vector<std::string>& keys();  // the keys of a full record

 private:
  void maybe_cull();
  void forget(const std::string& msg_id);  // NoDB: a finished task leaves its msg_id only
  void keep_buffers(const std::string& msg_id, TaskRecord& r, bool result, wire::Frames& from);
  template <class Pred>
  std::size_t drop_if(Pred pred);
  BufferCopier* copier_ = nullptr;
  std::unordered_set<std::string> unkept_;  // NoDB: msg_ids of finished tasks
  void erase(std::unordered_map<std::string, TaskRecord>::iterator it);
  void compact();

  RecordLimits limits_;
  std::size_t bytes_ = 0;
  std::unordered_map<std::string, TaskRecord> records_;
  std::deque<std::string> order_;     // submission order; ids of dropped records are skipped
  std::deque<std::string> finished_;  // completion order: culling takes from the front
};

}  // namespace pxf::controller
