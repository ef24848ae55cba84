#include "controller/records.hpp"

#include "controller/buffer_copier.hpp"

#include "controller/db_query.hpp"
#include "util/clock.hpp"

#include <algorithm>
#include <cmath>

namespace pxf::controller {

using wire::view;

namespace {
json parse_or_string(const std::string& s) {
  json j = json::parse(s, nullptr, false);
  return j.is_discarded() ? json(s) : j;
}
json parse_or_null(const std::string& s) {
  if (s.empty()) return json();
  return parse_or_string(s);
}
}  // namespace

json TaskRecord::header_json() const { return parse_or_null(header); }

TaskRecord& TaskRecords::add(const std::string& msg_id, wire::Message& request, const char* queue) {
  auto [it, fresh] = records_.try_emplace(msg_id);
  if (fresh) order_.push_back(msg_id);
  TaskRecord& r = it->second;
  r.queue = queue;
  if (!limits_.keep) return r;  // NoDB: a bare record while the task is pending
  r.header = std::string(view(request.header_frame));
  r.metadata = std::string(view(request.metadata_frame));
  r.content = std::string(view(request.content_frame));
  keep_buffers(msg_id, r, false, request.buffers);
  return r;
}

// Replaces the record's request (or result) buffers with `from`'s: small ones copied now (a
// received frame may point into a receive buffer libzmq shares between messages), large ones
// shared and, from kCopyAsyncBytes, copied on the copier's thread (adopt_copy swaps them in).
void TaskRecords::keep_buffers(const std::string& msg_id, TaskRecord& r, bool result, wire::Frames& from) {
  constexpr std::size_t kCopyBelow = 16384;
  wire::Frames& to = result ? r.result_buffers : r.buffers;
  std::uint64_t gen = ++(result ? r.result_gen : r.buffers_gen);
  for (auto& b : to) {
    r.bytes -= b.size();
    bytes_ -= b.size();
  }
  to.clear();
  for (auto& b : from) {
    r.bytes += b.size();
    bytes_ += b.size();
    if (b.size() < kCopyBelow) {
      to.emplace_back(b.data(), b.size());
      continue;
    }
    to.push_back(wire::share(b));
    if (!copier_ || b.size() < kCopyAsyncBytes) continue;
    BufferCopier::Job job;
    job.msg_id = msg_id;
    job.result = result;
    job.index = to.size() - 1;
    job.gen = gen;
    job.shared = wire::share(b);
    copier_->submit(std::move(job));
  }
}

bool TaskRecords::adopt_copy(const std::string& msg_id, bool result, std::size_t index, std::uint64_t gen,
                             zmq::message_t&& copy) {
  TaskRecord* r = find(msg_id);
  if (!r || gen != (result ? r->result_gen : r->buffers_gen)) return false;
  auto& frames = result ? r->result_buffers : r->buffers;
  if (index >= frames.size() || frames[index].size() != copy.size()) return false;
  frames[index] = std::move(copy);
  return true;
}

TaskRecord* TaskRecords::find(const std::string& msg_id) {
  auto it = records_.find(msg_id);
  return it == records_.end() ? nullptr : &it->second;
}

void TaskRecords::complete(const std::string& msg_id, wire::Message& reply) {
  TaskRecord* r = find(msg_id);
  if (!r) return;
  if (!limits_.keep) return forget(msg_id);
  if (!r->completed) finished_.push_back(msg_id);
  r->completed = true;
  r->result_header = std::string(view(reply.header_frame));
  r->result_metadata = std::string(view(reply.metadata_frame));
  r->result_content = std::string(view(reply.content_frame));
  r->received = iso_now();
  if (r->engine_uuid.empty()) r->engine_uuid = wire::get_or<std::string>(reply.metadata, "engine", "");
  keep_buffers(msg_id, *r, true, reply.buffers);
  maybe_cull();
}

void TaskRecords::complete(const std::string& msg_id, std::string header, std::string metadata, std::string content,
                           const std::string& engine_uuid) {
  TaskRecord* r = find(msg_id);
  if (!r) return;
  if (!limits_.keep) return forget(msg_id);
  if (!r->completed) finished_.push_back(msg_id);
  r->completed = true;
  r->result_header = std::move(header);
  r->result_metadata = std::move(metadata);
  r->result_content = std::move(content);
  r->received = iso_now();
  if (!engine_uuid.empty()) r->engine_uuid = engine_uuid;
  maybe_cull();
}

void TaskRecords::forget(const std::string& msg_id) {
  if (auto it = records_.find(msg_id); it != records_.end()) erase(it);
  unkept_.insert(msg_id);
  compact();
}

void TaskRecords::add_output(const std::string& parent_id, const std::string& msg_type, const json& content) {
  if (!limits_.keep) return;
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

void TaskRecords::erase(std::unordered_map<std::string, TaskRecord>::iterator it) {
  bytes_ -= it->second.bytes;
  records_.erase(it);
}

void TaskRecords::maybe_cull() {
  // As DictDB._maybe_cull: by count, the oldest cull_fraction of the limit at once (so the cost
  // per completed task stays constant); by size, until under (1 - cull_fraction) of the limit.
  // Only finished records go, oldest finished first.
  auto pop_oldest = [&]() -> bool {
    while (!finished_.empty()) {
      auto rec = records_.find(finished_.front());
      finished_.pop_front();
      if (rec == records_.end() || !rec->second.completed) continue;
      erase(rec);
      return true;
    }
    return false;
  };
  if (records_.size() > limits_.record_limit) {
    auto n = static_cast<std::size_t>(limits_.cull_fraction * static_cast<double>(limits_.record_limit));
    n = std::max<std::size_t>(n, records_.size() - limits_.record_limit);
    for (std::size_t i = 0; i < n && pop_oldest(); ++i) {}
  }
  if (bytes_ > limits_.size_limit) {
    auto target = static_cast<std::size_t>(static_cast<double>(limits_.size_limit) * (1 - limits_.cull_fraction));
    while (bytes_ > target && pop_oldest()) {}
  }
  compact();
}

void TaskRecords::compact() {
  // Forget dropped ids in the order lists once they are most of them.
  if (order_.size() > 2 * records_.size() + 64)
    std::erase_if(order_, [&](const std::string& id) { return !records_.count(id); });
  if (finished_.size() > 2 * records_.size() + 64)
    std::erase_if(finished_, [&](const std::string& id) { return !records_.count(id); });
}

template <class Pred>
std::size_t TaskRecords::drop_if(Pred pred) {
  std::size_t n = 0;
  for (auto it = records_.begin(); it != records_.end();) {
    auto next = std::next(it);
    if (pred(it->second)) {
      erase(it);
      ++n;
    }
    it = next;
  }
  compact();
  return n;
}

std::size_t TaskRecords::drop_completed() {
  unkept_.clear();
  return drop_if([](const TaskRecord& r) { return r.completed; });
}

std::size_t TaskRecords::drop(const std::vector<std::string>& ids) {
  std::size_t n = 0;
  for (auto& id : ids) {
    if (auto it = records_.find(id); it != records_.end()) {
      erase(it);
      ++n;
    }
    n += unkept_.erase(id);
  }
  compact();
  return n;
}

std::size_t TaskRecords::drop_engine(const std::string& engine_uuid) {
  return drop_if([&](const TaskRecord& r) { return r.completed && r.engine_uuid == engine_uuid; });
}

std::vector<std::string> TaskRecords::history() const {
  // Ordered by submission date (the request's header.date) as DictDB.get_history does; requests
  // on different sockets may reach us in another order than they were sent.
  std::vector<std::pair<std::int64_t, const std::string*>> dated;
  dated.reserve(records_.size());
  for (auto& id : order_) {
    auto it = records_.find(id);
    if (it == records_.end()) continue;
    json date = wire::get_or<json>(it->second.header_json(), "date", json());
    std::optional<std::int64_t> t;
    if (date.is_string()) t = parse_iso_date(date.get<std::string>());
    dated.emplace_back(t.value_or(0), &id);
  }
  std::stable_sort(dated.begin(), dated.end(), [](auto& a, auto& b) { return a.first < b.first; });
  std::vector<std::string> out;
  out.reserve(dated.size());
  for (auto& [t, id] : dated) out.push_back(*id);
  return out;
}

json TaskRecords::extract(const TaskRecord& r) {
  json io = {{"execute_input", r.execute_input},
             {"execute_result", r.execute_result},
             {"error", r.error},
             {"stdout", r.out},
             {"stderr", r.err}};
  return {{"header", r.header_json()},
          {"metadata", parse_or_null(r.metadata)},
          {"result_metadata", parse_or_null(r.result_metadata)},
          {"result_header", parse_or_null(r.result_header)},
          {"result_content", parse_or_null(r.result_content)},
          {"received", r.received.empty() ? json() : json(r.received)},
          {"io", io}};
}

const std::vector<std::string>& TaskRecords::keys() {
  static const std::vector<std::string> k = {
      "msg_id",         "header",          "metadata",       "content",        "buffers",     "submitted",
      "client_uuid",    "engine_uuid",     "started",        "completed",      "resubmitted", "received",
      "result_header",  "result_metadata", "result_content", "result_buffers", "queue",       "execute_input",
      "execute_result", "error",           "stdout",         "stderr",         "label"};
  return k;
}

json TaskRecords::to_json(const std::string& msg_id, const TaskRecord& r) {
  json result_header = parse_or_null(r.result_header);
  json result_metadata = parse_or_null(r.result_metadata);
  auto str_or_null = [](const json& obj, const char* key) {
    if (!obj.is_object()) return json();
    auto it = obj.find(key);
    return it == obj.end() ? json() : *it;
  };
  json content = r.content.empty() ? json::object() : parse_or_string(r.content);
  json header = r.header_json();
  json metadata = parse_or_null(r.metadata);
  json out = {{"msg_id", msg_id},
              {"header", header},
              {"metadata", metadata},
              {"content", content},
              {"submitted", str_or_null(header, "date")},
              {"client_uuid", str_or_null(header, "session")},
              {"engine_uuid", r.engine_uuid.empty() && !r.completed ? json() : json(r.engine_uuid)},
              {"started", str_or_null(result_metadata, "started")},
              {"completed", r.completed ? str_or_null(result_header, "date") : json()},
              {"resubmitted", r.resubmitted.empty() ? json() : json(r.resubmitted)},
              {"received", r.received.empty() ? json() : json(r.received)},
              {"result_header", result_header},
              {"result_metadata", result_metadata},
              {"result_content", parse_or_null(r.result_content)},
              {"queue", r.queue},
              {"execute_input", r.execute_input},
              {"execute_result", r.execute_result},
              {"error", r.error},
              {"stdout", r.out},
              {"stderr", r.err}};
  // ipyparallel 9.1's task label (`view.set_flags(label=...)` puts it in the request's
  // metadata; its hub keeps it as the record key `label`, None when unset). A full record
  // carries it only when the request set one, so records of requests without a label keep
  // stock 7.1's key set; `keys=['label']` and queries on it see None for those.
  if (metadata.is_object())
    if (auto it = metadata.find("label"); it != metadata.end()) out["label"] = *it;
  return out;
}

}  // namespace pxf::controller
