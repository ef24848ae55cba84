#pragma once
// The controller's table of engines: ids, uuids, registration state and queue bookkeeping.
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace pxf::controller {

// An append-only list of msg_ids in one buffer: a long-lived list that grows with every task
// must not scatter one small allocation per entry over the heap (that pins freed pages).
class IdLog {
 public:
  void push_back(std::string_view id) {
    data_.append(id);
    ends_.push_back(static_cast<std::uint32_t>(data_.size()));
  }
  std::size_t size() const { return ends_.size(); }
  std::vector<std::string> list() const {
    std::vector<std::string> out;
    out.reserve(ends_.size());
    std::uint32_t start = 0;
    for (auto end : ends_) {
      out.emplace_back(data_, start, end - start);
      start = end;
    }
    return out;
  }

 private:
  std::string data_;
  std::vector<std::uint32_t> ends_;
};

struct Engine {
  int id = -1;
  std::string uuid;                      // ZMQ identity of all its sockets
  bool registered = false;               // false until its first heartbeat
  std::int64_t pending_deadline_ms = 0;  // registration stalls after this
  int missed_beats = 0;
  bool answered = true;                   // answered a ping since the last beat
  std::unordered_set<std::string> queue;  // outstanding direct (mux) requests
  std::unordered_set<std::string> tasks;  // outstanding load-balanced tasks
  IdLog completed;                        // finished msg_ids, both queues
  std::string job;                        // fabric job uuid (MPI engines); "" = stock engine
  std::string host;                       // MPI engines: the rank's hostname; stock: peer address
  int rank = -1;                          // MPI engines: the rank in its job
  std::uint64_t serial = 0;               // this registration: ids come back (restart), serials never
};

class EngineTable {
 public:
  // Picks an id: `requested` if no live engine holds it (an id of an engine gone is given
  // again on request, as stock does), else the next never-used id (unrequested ids are not
  // reused).
  int allocate_id(int requested);
  bool id_free(int id) const { return !engines_.count(id); }
  int max_used_id() const;
  Engine& add(int id, std::string uuid);
  void mark_registered(Engine& e);
  void remove(int id);

  Engine* by_id(int id);
  Engine* by_uuid(std::string_view uuid);
  bool uuid_known(std::string_view uuid) const { return by_uuid_.count(std::string(uuid)) != 0; }

  std::map<int, Engine>& all() { return engines_; }
  std::size_t registered_count() const;
  std::size_t pending_count() const { return pending_; }
  // Ids ever registered (stock keeps dead ids visible to queue_status).
  const std::vector<int>& history() const { return history_; }
  // The finished msg_ids of a removed engine (stock's hub keeps an engine's completed list
  // when it goes away, so queue_status still counts them); nullptr if none kept. Forgotten
  // when the id registers again, as stock starts it afresh.
  const IdLog* retired_completed(int id) const;

 private:
  std::map<int, Engine> engines_;
  std::unordered_map<std::string, int> by_uuid_;
  std::unordered_set<int> used_ids_;
  std::vector<int> history_;
  std::unordered_map<int, IdLog> retired_completed_;
  int next_id_ = 0;
  std::uint64_t serials_ = 0;
  std::size_t pending_ = 0;  // added, not yet registered
};

}  // namespace pxf::controller
