#pragma once
// The controller's end of the fabric link (docs/fabric-link.md, names in link/protocol.hpp):
// one ROUTER, one connection per MPI job, messages prefixed with a channel frame. A job's
// gateway registers all of its ranks at once and speaks for them; its heart thread beats on a
// second connection ("<job>/hb").
//
// Also the one way to an engine (send_to_engine): its stock socket, or its job's gateway.
#include "controller/engines.hpp"
#include "controller/event_loop.hpp"
#include "controller/options.hpp"

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace pxf::controller {

class BroadcastScheduler;
class Hub;
class Relays;
class TaskScheduler;

class JobLink {
 public:
  // `fabric` is the link's ROUTER, `fabric_monitor` its disconnect monitor; mux_out,
  // control_out and task_out are the stock engine-facing sockets.
  JobLink(EventLoop& loop, EngineTable& engines, const Options& opts, zmq::socket_t& fabric,
          zmq::socket_t& fabric_monitor, zmq::socket_t& mux_out, zmq::socket_t& control_out, zmq::socket_t& task_out);
  // Where messages from the link go. Attached after construction: these send through the link.
  void attach(Hub& hub, TaskScheduler& tasks, BroadcastScheduler& broadcasts, Relays& relays);

  // Sends [E, C, DELIM, ...] to engine E: on the stock socket of `channel` (link::kMuxChannel,
  // kControlChannel or kTaskChannel), or through its job's gateway on the fabric link.
  void send_to_engine(const char* channel, const Engine& e, Frames&& frames);
  // A link control message to a job (link/protocol.hpp).
  void send_link(const std::string& job, const char* type, const json& content, const json& parent);

  // [G, channel, rest...] from a gateway.
  void on_fabric(Frames&& frames);
  // Disconnect events of the fabric ROUTER (zmq_socket_monitor): a gateway whose process died
  // is found within one ping period instead of after max_heartbeat_misses of them.
  void on_monitor();
  // Probes every job when a disconnect was seen one ping period ago.
  void on_timers(std::int64_t now);
  std::int64_t next_probe_ms() const { return probe_at_ms_; }  // 0 = none due

  // Jobs heard from last more than `limit_ms` ago (the heart monitor drops them).
  std::vector<std::string> silent_jobs(std::int64_t now, std::int64_t limit_ms) const;
  // Unregisters the job's engines (those still of this job) and forgets it.
  void drop_job(const std::string& job, const std::string& why);
  // An engine of `job` unregistered: its last replies are still delivered (below).
  void retire(const std::string& uuid, const std::string& job);
  // pxf_shutdown to every job (the controller is exiting).
  void shutdown_jobs(const std::string& reason);

 private:
  struct Job {
    std::string uuid;
    std::vector<int> engine_ids;
    std::int64_t last_heard_ms = 0;
  };
  void on_link(const std::string& job, Frames&& frames);
  void on_job_heart(std::string rid, Frames&& frames);
  void on_job_register(const std::string& job, const Message& m);
  void probe_jobs();
  // False when the fabric ROUTER can no longer route to the job's gateway (its connection closed).
  bool probe_job(const std::string& uuid);

  EventLoop& loop_;
  Counters& counters_;
  EngineTable& engines_;
  const Options& opts_;
  zmq::socket_t& fabric_;
  zmq::socket_t& fabric_monitor_;
  zmq::socket_t& mux_out_;
  zmq::socket_t& control_out_;
  zmq::socket_t& task_out_;
  Hub* hub_ = nullptr;
  TaskScheduler* tasks_ = nullptr;
  BroadcastScheduler* broadcasts_ = nullptr;
  Relays* relays_ = nullptr;

  std::unordered_map<std::string, Job> jobs_;
  // uuid -> job of engines unregistered recently: their last replies (e.g. the control reply
  // to a shutdown_request, which races the iopub shutdown_reply) are still delivered.
  std::unordered_map<std::string, std::string> retired_;
  std::int64_t probe_at_ms_ = 0;
};

}  // namespace pxf::controller
