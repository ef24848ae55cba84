#pragma once
// Task records: what the hub remembers of each direct and load-balanced request, so that
// result_request (rc.get_result from any client), history_request and queue_status work.
// Bounded like the stock in-memory DictDB: past the record or size limit, the oldest finished
// records are culled (a tenth of the limit at a time).
#include "wire/message.hpp"

#include <cstddef>
#include <deque>
#include <optional>
#include <string>
#include <unordered_map>

namespace pxf::controller {

using wire::json;

struct TaskRecord {
  json header;                 // the request's header
  json metadata;               // the request's metadata
  std::string queue;           // "mux" or "task"
  std::string engine_uuid;     // "" until assigned
  bool completed = false;
  std::string result_header, result_metadata, result_content;  // reply JSON, as received
  wire::Frames result_buffers;                                 // shares the reply's frames
  std::string received;        // ISO date the reply passed
  json execute_input, execute_result, error;  // from iopub (null when none)
  std::string out, err;        // stdout / stderr from iopub
  std::size_t bytes = 0;       // buffer bytes held
};

class TaskRecords {
 public:
  TaskRecords(std::size_t record_limit = 1024, std::size_t size_limit = std::size_t{1} << 30)
      : record_limit_(record_limit), size_limit_(size_limit) {}

  TaskRecord& add(const std::string& msg_id, const json& header, const json& metadata, const char* queue);
  TaskRecord* find(const std::string& msg_id);
  // Stores the reply (buffers shared, not copied) and culls if over a limit.
  void complete(const std::string& msg_id, wire::Message& reply);
  // Folds an iopub message into its parent's record.
  void add_output(const std::string& parent_id, const std::string& msg_type, const json& content);

  // msg_ids of every record, in submission order.
  std::vector<std::string> history() const;
  std::size_t size() const { return records_.size(); }
  // result_request's per-message entry: header, metadata, result_*, received, io.
  static json extract(const TaskRecord& r);

 private:
  void cull();

  std::size_t record_limit_, size_limit_, bytes_ = 0;
  std::unordered_map<std::string, TaskRecord> records_;
  std::deque<std::string> order_;     // submission order; ids of culled records are skipped
  std::deque<std::string> finished_;  // completion order: culling takes from the front
};

} // namespace pxf::controller
