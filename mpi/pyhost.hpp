#pragma once
// The embedded-Python side of one rank: owns pxfabric.engine.EngineRuntime, runs shell requests
// on the main thread, control requests (abort/shutdown/signal) and the 0.2 s output flush on a
// control thread, and turns replies and IOPub messages into signed link-format messages handed to
// the Fabric. Requests arrive from the fabric thread through deliver(), which never takes the GIL.
// The Python half of this bridge is python/pxfabric/host.py. A RankWatch (rank_watch.hpp), on
// threads of its own, reports a rank an interrupt does not free and answers pxf_where_request.
#include "mpi/fabric.hpp"
#include "mpi/rank_watch.hpp"
#include "wire/session.hpp"

#include <pybind11/embed.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace pxf::mpi {

namespace py = pybind11;

struct HostConfig {
  int rank = 0;
  int engine_id = 0;
  std::string uuid;
  std::string profile_dir;
  int log_fd = 2;  // where Python logging goes (the original stderr)
  int log_level = 20;
  bool capture_fds = true;
  // Seconds an interrupt may take to return the rank to Python before the rank reports where it
  // is stuck on its stderr (--interrupt-grace, $PXF_INTERRUPT_GRACE); 0 = never report.
  double interrupt_grace = 3.0;
  std::vector<std::string> shell_config;  // --Class.trait=value for the IPython shell
};

class PyHost final : public LocalRank, private RankWatch::Host {
 public:
  PyHost(HostConfig cfg, wire::SessionOptions session);
  ~PyHost() override;

  void attach(Fabric* fabric) { fabric_ = fabric; }
  // Main thread, GIL held: builds the EngineRuntime, starts the control thread and the watch.
  void create_runtime();
  // Main thread, GIL held (released while waiting): runs requests until the job ends.
  void run();
  // Main thread, GIL held: closes the runtime, stops the control thread and the watch.
  void close();

  void deliver(Frames&& frames, double received) override;
  void job_ended(int code) override;

 private:
  struct Work {
    enum Kind { shell, control, exit } kind = shell;
    Frames route;
    std::string parent;    // request header JSON: the parent of everything this request causes
    std::string metadata;  // request metadata JSON
    zmq::message_t content;
    Frames buffers;
    double received = 0;
    std::string msg_type;
  };

  void push_work(Work&& w, bool front);
  void push_control(Work&& w);
  void control_loop();
  void run_shell(Work& w);
  void run_control(Work& w);
  void send_reply(Frames route, const std::string& parent, const std::string& msg_type, py::bytes content,
                  py::bytes metadata, Frames buffers);
  void publish(py::object msg_type, py::object content, py::object parent, py::object metadata, py::object buffers,
               py::object topic);
  void rank_down(const char* why);

  // RankWatch::Host: the watch's calls into Python (on its GIL thread) and out to the link.
  std::string where_state(const std::string& info) override;
  void stuck_report(const std::string& info, const std::string& parent) override;
  void post(Frames&& frames) override;

  HostConfig cfg_;
  wire::Session session_;
  Fabric* fabric_ = nullptr;

  py::object host_py_, rt_;  // pxfabric.host (python/pxfabric/host.py), the EngineRuntime
  // The last JSON packed for a dict of str values (a request's parent header, the engine's
  // metadata: each published again with every message of a request), keyed by a copy of it.
  struct PackCache {
    py::object key;
    std::string json;
  };
  PackCache parent_cache_, metadata_cache_;  // under the GIL
  std::string pack_cached(py::handle dict, PackCache& cache);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Work> work_;
  std::deque<Work> control_;
  std::condition_variable control_cv_;
  std::atomic<bool> job_over_{false};
  std::atomic<bool> down_{false};
  std::atomic<bool> stop_control_{false};
  std::thread control_thread_;

  // The stuck-rank reporter and pxf_where_request's answers, on threads of their own (after
  // session_: it signs with it).
  RankWatch watch_;
};

// Adds the pxfabric package location to sys.path and imports the heavy modules (IPython,
// ipyparallel, pxfabric.engine). Throws py::error_already_set on failure.
void import_engine_modules();

}  // namespace pxf::mpi
