#pragma once
// pxcontroller: hub, direct/control relays, load-balanced and broadcast schedulers, the iopub
// relay and the heartbeat, in one process with one event loop (protocol §3-§8).
//
// Concurrency: everything runs on the thread that calls run(); request_stop() may be called
// from a signal handler.
#include "conn/connection_file.hpp"
#include "conn/profile.hpp"
#include "controller/engines.hpp"
#include "controller/buffer_copier.hpp"
#include "controller/dependency.hpp"
#include "controller/load_balancer.hpp"
#include "controller/options.hpp"
#include "controller/records.hpp"
#include "wire/session.hpp"

#include <array>
#include <atomic>
#include <deque>
#include <map>
#include <queue>
#include <tuple>
#include <memory>
#include <optional>
#include <unordered_map>

namespace pxf::controller {

using wire::Frames;
using wire::json;
using wire::Message;

class Controller {
 public:
  explicit Controller(Options opts);
  ~Controller();

  // Binds every socket and writes both connection files. Throws on failure.
  void start();
  // Serves until a stop is requested (signal or shutdown_request); removes the files.
  int run();
  void request_stop() { stop_requested_ = true; }

  const conn::ClientInfo& client_info() const { return client_info_; }
  const conn::EngineInfo& engine_info() const { return engine_info_; }

 private:
  // --- sockets and files
  zmq::socket_t make_router(const char* routing_id);
  int bind(zmq::socket_t& s, const std::string& ip);
  void write_connection_files();
  void remove_connection_files();

  // --- event loop
  void poll_once(long timeout_ms);
  void on_timers();
  // Decodes and verifies; a refused message is logged (rate-limited) and counted.
  // `refused` (optional) receives the reason and detail of a refusal.
  bool decode(const char* channel, Frames&& frames, Message& out, wire::DecodeOptions opts,
              wire::Decoded* refused = nullptr);
  void send(zmq::socket_t& s, Frames&& frames, const char* channel);

  // --- hub (registration socket)
  void on_query(Frames&& frames);
  void reply(const zmq::message_t& ident, const Message& req, const char* type, const json& content,
             Frames buffers = {});
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
  void finish_registration(Engine& e);
  void unregister(int id, const std::string& why);
  void notify(const char* type, const json& content, const json& parent = json::object());

  // --- heartbeat
  void beat();
  void on_pong(Frames&& frames);

  // --- direct (mux) and control relays
  void on_client_direct(Frames&& frames, bool control);
  void on_engine_direct(Frames&& frames, bool control);
  void reject_request(zmq::socket_t& s, zmq::message_t client, Message& m, const json& content,
                      const char* channel);

  // --- load-balanced tasks (tasks.cpp): the stock TaskScheduler's semantics (protocol §7)
  struct Task {
    Message msg;                    // identities = [client]; none for a hub resubmission
    std::string msg_id;
    TaskKey key = 0;
    std::vector<int> targets;       // allowed engine ids, when `targeted`
    bool targeted = false;
    std::vector<int> blacklist;     // engines it failed on (retries, unmet @depend/@require)
    Dependency after, follow;
    double timeout_s = 0;           // armed each time the task is parked; 0 = none
    int retries = 0;
    std::uint64_t seq = 0;          // queue position: submission order, re-parked tasks last
    std::uint64_t timer = 0;        // generation of its current timeout
    int engine = -1;                // in flight: on which engine
    int queue = 0;                  // parked: 0 blocked, 1 in free_, 2 in constrained_
    bool hub = false;               // resubmitted by the hub: the reply goes to nobody
    bool plain() const { return follow.empty() && !targeted && blacklist.empty(); }
  };
  enum class Run { ran, failed, wait };
  void on_task_submit(Frames&& frames, bool from_hub = false);
  void on_task_reply(Frames&& frames);
  // Reads the request metadata into `t`; throws DependencyError for what it cannot read.
  void read_task_metadata(Task& t, const json& md);
  // Validates and queues or runs a new task (stock dispatch_submission after parsing).
  void schedule(Task&& t);
  // Runs `t` now if an engine may take it (stock maybe_run). ran: sent to an engine; failed:
  // answered with ImpossibleDependency; in both cases `t` has been moved from. wait: untouched.
  Run maybe_run(Task& t);
  void submit_to(Task&& t, Engine& e);
  // Parks a task until its dependencies are met and an engine can take it (stock save_unmet).
  void park(Task&& t);
  // A reply that does not count (unmet @depend, or a failure with retries left): try elsewhere.
  void retry_elsewhere(Task&& t, int engine);
  // The end of a task: relay `reply` (or nothing for a hub resubmission), record, unblock.
  void task_done(Task&& t, Message&& reply, bool success);
  // Answers a task in the scheduler's name (InvalidDependency, ImpossibleDependency,
  // TaskTimeout, bad metadata): no engine frame, metadata {}; counts as failed for dependents.
  void fail_unreachable(Task&& t, const json& content);
  void fail_task(Task&& t, int engine_id, const std::string& engine_uuid, const json& content, const json& metadata);
  // Re-examines what `done` unblocks, then gives engines with room the first runnable tasks.
  void settle();
  void dispatch_runnable();
  std::size_t waiting_count() const { return parked_.size(); }
  void on_task_timeouts(std::int64_t now);
  void maybe_trim(std::int64_t now);
  // Takes a parked task out of the queues.
  Task unpark(std::unordered_map<TaskKey, Task>::iterator it);
  // Fails or reschedules the tasks an engine had when it went away (stock handle_stranded_tasks).
  void strand_tasks(int engine_id, const std::string& uuid, const std::vector<std::string>& msg_ids);

  // --- broadcast
  // --- broadcast
  // A coalescing broadcast waits for one reply per part: a stock engine (one target) or a
  // fabric job (all of its targets, gathered over MPI by the gateway).
  struct BroadcastPart {
    std::string job;                                   // "" for a stock engine
    std::vector<std::pair<std::string, int>> targets;  // (uuid, id) in request order
    std::optional<Message> reply;
    bool done = false;                                 // replied, or its engine(s) died
  };
  struct Broadcast {
    std::string client;
    std::vector<BroadcastPart> parts;
    std::size_t remaining = 0;
    std::optional<std::size_t> last;                   // part of the last reply received
  };
  void on_broadcast_submit(Frames&& frames);
  void on_broadcast_reply(Frames&& frames);
  void on_coalesced_part(const std::string& job, Frames&& frames);
  void part_done(const std::string& orig_id, Broadcast& b, std::size_t part);
  Broadcast* find_broadcast(const std::string& orig_id);  // counts an unexpected reply if none
  void emit_coalesced(const std::string& orig_id, Broadcast& b);

  // --- fabric link (docs/fabric-link.md): MPI engine jobs behind one gateway each
  struct Job {
    std::string uuid;
    std::vector<int> engine_ids;
    std::int64_t last_heard_ms = 0;
  };
  void on_fabric(Frames&& frames);
  void on_link(const std::string& job, Frames&& frames);
  static json request_header(const Message& m);
  static constexpr std::string_view kHeartSuffix = "/hb";  // routing id of a job's heart thread
  void on_job_heart(std::string rid, Frames&& frames);
  void on_job_register(const std::string& job, const Message& m);
  void drop_job(const std::string& job, const std::string& why);
  void send_link(const std::string& job, const char* type, const json& content, const json& parent);
  // Sends [E, C, DELIM, ...] to engine E: on the stock socket of `channel`, or through its job's
  // gateway on the fabric link.
  void send_to_engine(const char* channel, const Engine& e, Frames&& frames);

  // --- iopub
  void on_iopub(Frames&& frames);

  Options opts_;
  conn::ProfileLocation location_;
  conn::ClientInfo client_info_;
  conn::EngineInfo engine_info_;
  std::unique_ptr<wire::Session> session_;
  zmq::context_t ctx_;
  std::vector<int> port_pool_;

  zmq::socket_t query_, notifier_;
  zmq::socket_t mux_in_, mux_out_, control_in_, control_out_;
  zmq::socket_t task_in_, task_out_, bcast_in_, bcast_out_;
  zmq::socket_t iopub_in_, iopub_out_, hb_ping_, hb_pong_, fabric_;
  // Disconnect events of the fabric ROUTER (zmq_socket_monitor): a gateway whose process died
  // is found within one ping period instead of after max_heartbeat_misses of them.
  zmq::socket_t fabric_monitor_;
  std::int64_t fabric_probe_at_ms_ = 0;
  void on_fabric_monitor();
  // --curve: failed CurveZMQ handshakes on the registration socket (every client and stock
  // engine starts there) and on the fabric port, counted and logged (a wrong curve_serverkey,
  // or a peer without CurveZMQ, is refused by libzmq and never reaches a handler).
  zmq::socket_t query_monitor_;
  void drain_query_monitor();
  void count_handshake_failure(const char* where, std::uint16_t event);
  void probe_jobs();
  // False when the fabric ROUTER can no longer route to the job's gateway (its connection closed).
  bool probe_job(const std::string& uuid);

  EngineTable engines_;
  LoadBalancer balancer_;
  // Scheduler state. A parked task is either blocked (a dependency is pending: it is found
  // through graph_ when that one finishes) or runnable (in free_ when any engine will do, else
  // in constrained_), so a finished task costs work only for its own dependents.
  TaskOutcomes outcomes_;
  std::unordered_map<TaskKey, Task> parked_;
  std::map<std::uint64_t, TaskKey> free_, constrained_;      // runnable, by seq
  std::unordered_map<TaskKey, std::vector<TaskKey>> graph_;  // dependency -> parked dependents
  std::deque<TaskKey> done_;                                 // finished, dependents not yet examined
  std::unordered_map<TaskKey, Task> in_flight_;
  using Timeout = std::tuple<std::int64_t, TaskKey, std::uint64_t>;  // deadline, task, generation
  std::priority_queue<Timeout, std::vector<Timeout>, std::greater<>> timeouts_;
  std::uint64_t task_seq_ = 0;
  bool settling_ = false;
  std::size_t tasks_since_trim_ = 0;  // tasks finished since the last malloc_trim
  std::int64_t trim_at_ms_ = 0;            // next once-a-second look (maybe_trim)
  std::uint64_t rx_at_trim_check_ = 0;     // work_received() at the last look
  bool active_since_trim_ = false;         // messages arrived since the last trim
  std::unordered_map<std::string, Broadcast> broadcasts_;
  BufferCopier copier_;  // before records_: they hold a pointer to it
  TaskRecords records_;
  std::unordered_map<std::string, Job> jobs_;
  // uuid -> job of engines unregistered recently: their last replies (e.g. the control reply
  // to a shutdown_request, which races the iopub shutdown_reply) are still delivered.
  std::unordered_map<std::string, std::string> retired_;

  std::int64_t beat_seq_ = 0, oldest_valid_beat_ = 0, next_beat_ms_ = 0, fast_ping_until_ms_ = 0;
  std::int64_t next_fast_ping_ms_ = 0;
  std::int64_t shutdown_at_ms_ = 0;
  std::atomic<bool> stop_requested_{false};
  bool files_written_ = false;
  std::unordered_map<std::string, std::uint64_t> counters_;  // drops, errors, fabric traffic by kind
  static constexpr std::size_t kSources = 12;                   // sockets poll_once reads
  static const std::array<const char*, kSources> kSourceNames;
  std::array<std::uint64_t, kSources> received_{};              // messages read per socket
  static constexpr std::size_t kPongSource = 10;                // "hb": heartbeats, not work
  // Messages read on every socket but the heartbeat's (which is never quiet while engines live).
  std::uint64_t work_received() const {
    std::uint64_t n = 0;
    for (std::size_t i = 0; i < kSources; ++i)
      if (i != kPongSource) n += received_[i];
    return n;
  }

  // Event loop: one epoll set over the sockets' ZMQ_FDs (zmq_poll over 13 sockets costs two
  // syscalls per socket per call). A ZMQ_FD only signals new *commands*: a socket may hold
  // messages without signalling once anything (a send, a recv) has processed its commands.
  // So a socket stays "maybe readable" until a recv on it returned EAGAIN, and every send on
  // a polled socket marks it again (mark_sent).
  static constexpr std::size_t kMonitor = kSources;            // index of fabric_monitor_
  static constexpr std::uint32_t kCopierEvent = 1000;            // epoll tag of copier_.fd()
  std::array<zmq::socket_t*, kSources + 1> polled_{};
  std::array<bool, kSources + 1> maybe_readable_{};
  int epoll_fd_ = -1;
  void setup_event_loop();
  void mark_sent(const zmq::socket_t& s);
};

} // namespace pxf::controller
