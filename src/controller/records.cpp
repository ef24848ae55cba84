#include "controller/records.hpp"

#include "util/clock.hpp"

#include <algorithm>

namespace pxf::controller {

using wire::view;

TaskRecord& TaskRecords::add(const std::string& msg_id, const json& header, const json& metadata, const char* queue) {
  auto [it, fresh] = records_.try_emplace(msg_id);
  if (fresh) order_.push_back(msg_id);
  TaskRecord& r = it->second;
  r.header = header;
  r.metadata = metadata;
  r.queue = queue;
  return r;
}

TaskRecord* TaskRecords::find(const std::string& msg_id) {
  auto it = records_.find(msg_id);
  return it == records_.end() ? nullptr : &it->second;
}

void TaskRecords::complete(const std::string& msg_id, wire::Message& reply) {
  TaskRecord* r = find(msg_id);
  if (!r) return;
  if (!r->completed) finished_.push_back(msg_id);
  r->completed = true;
  r->result_header = std::string(view(reply.header_frame));
  r->result_metadata = std::string(view(reply.metadata_frame));
  r->result_content = std::string(view(reply.content_frame));
  r->received = iso_now();
  if (r->engine_uuid.empty()) r->engine_uuid = wire::get_or<std::string>(reply.metadata, "engine", "");
  r->result_buffers.clear();
  for (auto& b : reply.buffers) {
    r->result_buffers.push_back(wire::share(b));
    r->bytes += b.size();
    bytes_ += b.size();
  }
  if (records_.size() > record_limit_ || bytes_ > size_limit_) cull();
}

void TaskRecords::add_output(const std::string& parent_id, const std::string& msg_type, const json& content) {
  TaskRecord* r = find(parent_id);
  if (!r) return;
  if (msg_type == "stream") {
    auto text = wire::get_or<std::string>(content, "text", "");
    (wire::get_or<std::string>(content, "name", "stdout") == "stderr" ? r->err : r->out) += text;
  } else if (msg_type == "execute_input") {
    r->execute_input = wire::get_or<json>(content, "code", json());
  } else if (msg_type == "execute_result") {
    r->execute_result = content;
  } else if (msg_type == "error") {
    r->error = content;
  }
}

void TaskRecords::cull() {
  // The oldest finished records go, a tenth of the limit at a time (as DictDB does), so the
  // cost per completed task stays constant however many tasks are in flight.
  std::size_t target = std::max<std::size_t>(1, record_limit_ / 10);
  std::size_t dropped = 0;
  while (!finished_.empty() && (dropped < target || bytes_ > size_limit_)) {
    auto rec = records_.find(finished_.front());
    finished_.pop_front();
    if (rec == records_.end()) continue;
    bytes_ -= rec->second.bytes;
    records_.erase(rec);
    ++dropped;
  }
  // Forget culled ids in the submission order once they are most of it.
  if (order_.size() > 2 * records_.size() + 64)
    std::erase_if(order_, [&](const std::string& id) { return !records_.count(id); });
}

std::vector<std::string> TaskRecords::history() const {
  std::vector<std::string> out;
  out.reserve(records_.size());
  for (auto& id : order_)
    if (records_.count(id)) out.push_back(id);
  return out;
}

json TaskRecords::extract(const TaskRecord& r) {
  auto parse = [](const std::string& s) {
    json j = json::parse(s, nullptr, false);
    return j.is_discarded() ? json(s) : j;
  };
  json io = {{"execute_input", r.execute_input},
             {"execute_result", r.execute_result},
             {"error", r.error},
             {"stdout", r.out.empty() ? json() : json(r.out)},
             {"stderr", r.err.empty() ? json() : json(r.err)}};
  return {{"header", r.header},
          {"metadata", r.metadata},
          {"result_metadata", parse(r.result_metadata)},
          {"result_header", parse(r.result_header)},
          {"result_content", parse(r.result_content)},
          {"received", r.received},
          {"io", io}};
}

} // namespace pxf::controller
