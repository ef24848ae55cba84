#pragma once
// The hub: registration, queries and notifications on the registration socket (protocol §4):
// engines register and unregister here, clients query engines, queues, task records
// (db/result/history/purge/resubmit), pxfabric's stats and engine list, and ask for shutdown.
#include "conn/connection_file.hpp"
#include "controller/buffer_copier.hpp"
#include "controller/engines.hpp"
#include "controller/event_loop.hpp"
#include "controller/options.hpp"
#include "controller/records.hpp"

#include <cstdint>
#include <deque>
#include <string>

namespace pxf::controller {

class BroadcastScheduler;
class HeartMonitor;
class JobLink;
class TaskScheduler;

class Hub {
 public:
  // Answers on `query`, notifies on `notifier`; `engine_info` is what a registering engine is
  // told to connect to.
  Hub(EventLoop& loop, EngineTable& engines, TaskRecords& records, TaskScheduler& tasks, BroadcastScheduler& broadcasts,
      JobLink& link, HeartMonitor& heart, const BufferCopier& copier, const Options& opts,
      const conn::EngineInfo& engine_info, zmq::socket_t& query, zmq::socket_t& notifier);

  void on_query(Frames&& frames);

  // A registered engine (first pong, or its job registered): it takes tasks, clients are told.
  void finish_registration(Engine& e);
  // A client subscribed to notifications. The stock client learns of engines from its
  // connection reply and then from notifications, but its subscription reaches us some time
  // after that reply, and a PUB drops what nobody has subscribed to yet: an engine that
  // registered in between stayed unknown to that client for good (wait_for_engines timed out
  // with the engines up). So each subscription repeats, to every subscriber, the
  // registration_notification of the engines registered within kReplayWindowMs that are still
  // registered; a client handles a registration it knows already as a no-op. At most one
  // repeat per kReplayIntervalMs (subscriptions are not signed: a flood of them coalesces).
  void on_subscription(Frames&& frames);
  static constexpr std::int64_t kReplayWindowMs = 10000;
  static constexpr std::int64_t kReplayIntervalMs = 100;
  // A repeat held back by kReplayIntervalMs: when it is due (0 = none), and sending it.
  std::int64_t next_replay_ms() const { return replay_due_ms_; }
  void on_timers(std::int64_t now);
  // An engine goes: notification, its tasks elsewhere or failed, broadcasts stop waiting for it.
  void unregister(int id, const std::string& why);
  void unregister_all(const std::string& why);

  // After a shutdown_request: when the controller stops (0 = not asked).
  std::int64_t shutdown_at_ms() const { return shutdown_at_ms_; }

 private:
  void reply(const zmq::message_t& ident, const Message& req, const char* type, const json& content,
             Frames buffers = {});
  void notify(const char* type, const json& content, const json& parent = json::object());
  void on_connection_request(const zmq::message_t& ident, const Message& m);
  void on_registration_request(const zmq::message_t& ident, const Message& m);
  void on_unregistration_request(const Message& m);
  void on_queue_request(const zmq::message_t& ident, const Message& m);
  void on_result_request(const zmq::message_t& ident, const Message& m);
  void on_history_request(const zmq::message_t& ident, const Message& m);
  void on_db_request(const zmq::message_t& ident, const Message& m);
  void on_purge_request(const zmq::message_t& ident, const Message& m);
  void on_resubmit_request(const zmq::message_t& ident, const Message& m);
  void on_shutdown_request(const zmq::message_t& ident, const Message& m);
  void on_stats_request(const zmq::message_t& ident, const Message& m);
  // pxf_engines_request: {id: {uuid, host, job, rank}} of registered engines (pxcluster list).
  void on_engines_request(const zmq::message_t& ident, const Message& m);

  EventLoop& loop_;
  Counters& counters_;
  EngineTable& engines_;
  TaskRecords& records_;
  TaskScheduler& tasks_;
  BroadcastScheduler& broadcasts_;
  JobLink& link_;
  HeartMonitor& heart_;
  const BufferCopier& copier_;
  const Options& opts_;
  const conn::EngineInfo& engine_info_;
  zmq::socket_t& query_;
  zmq::socket_t& notifier_;
  std::int64_t shutdown_at_ms_ = 0;
  struct RecentRegistration {
    std::int64_t at_ms;
    int id;
    std::uint64_t serial;  // the registration, not just the id (ids come back after a restart)
  };
  std::deque<RecentRegistration> recent_;  // oldest first, at most kReplayWindowMs old
  std::int64_t replay_due_ms_ = 0;
  std::int64_t last_replay_ms_ = -kReplayIntervalMs;
  void forget_old_registrations(std::int64_t now);
  void repeat_recent_registrations(std::int64_t now);
};

}  // namespace pxf::controller
