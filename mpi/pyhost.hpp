#pragma once
// The embedded-Python side of one rank: owns pxfabric.engine.EngineRuntime, runs shell requests
// on the main thread, control requests (abort/shutdown/signal) and the 0.2 s output flush on a
// control thread, and turns replies and IOPub messages into signed link-format messages handed to
// the Fabric. Requests arrive from the fabric thread through deliver(), which never takes the GIL.
// The Python half of this bridge is python/pxfabric/host.py.
#include "mpi/fabric.hpp"
#include "wire/session.hpp"

#include <pybind11/embed.h>

#include <atomic>
#include <condition_variable>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <pthread.h>
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
  int log_fd = 2;      // where Python logging goes (the original stderr)
  int log_level = 20;
  bool capture_fds = true;
  // Seconds an interrupt may take to return the rank to Python before the rank reports where it
  // is stuck on its stderr (--interrupt-grace, $PXF_INTERRUPT_GRACE); 0 = never report.
  double interrupt_grace = 3.0;
};

class PyHost final : public LocalRank {
 public:
  PyHost(HostConfig cfg, wire::SessionOptions session);
  ~PyHost() override;

  void attach(Fabric* fabric) { fabric_ = fabric; }
  // Main thread, GIL held: builds the EngineRuntime and starts the control thread.
  void create_runtime();
  // Main thread, GIL held (released while waiting): runs requests until the job ends.
  void run();
  // Main thread, GIL held: closes the runtime, stops the control thread.
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
  void publish(py::object msg_type, py::object content, py::object parent, py::object metadata,
               py::object buffers, py::object topic);
  void rank_down(const char* why);

  // Diagnosis of a rank that an interrupt does not free (a hung collective), and the answers to
  // `pxf_where_request` (`pxcluster where`). Both run on the watch thread, which never waits for
  // the GIL for long: the main thread may hold it inside native code. Python work goes to the
  // GIL thread with a deadline; past it, the main thread's stack comes from faulthandler
  // (a signal whose handler writes the stack into a pipe without the GIL).
  struct Running {
    std::uint64_t seq = 0;    // shell requests started so far
    bool busy = false;
    std::string parent;       // header JSON of the running shell request
    std::string msg_type;
    std::chrono::steady_clock::time_point since;
    std::chrono::steady_clock::time_point interrupted;  // last SIGINT request while it runs
    std::chrono::steady_clock::time_point landed;       // last KeyboardInterrupt raised in it
    bool was_interrupted = false;
    // The interrupt reached Python (the rank is not stuck, though it may be busy with it).
    bool interrupt_landed() const { return was_interrupted && landed >= interrupted; }
  };
  struct Watch {
    std::uint64_t seq;
    std::chrono::steady_clock::time_point due;
  };
  struct GilJob;
  void watch_loop();
  void gil_loop();
  // Runs fn on the GIL thread; false if it did not get the GIL (and finish) within `wait`.
  bool with_gil_for(std::chrono::milliseconds wait, std::function<void()> fn);
  void note_signal_request(const zmq::message_t& content);
  void answer_where(Work& w);
  void report_stuck(const Running& r);
  // The main thread's Python stack without the GIL (faulthandler); "" if it did not answer.
  std::string native_stack();
  Running running();

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

  std::mutex run_mu_;
  Running run_;  // under run_mu_
  std::mutex watch_mu_;
  std::condition_variable watch_cv_;
  std::vector<Watch> watches_;  // under watch_mu_
  std::deque<Work> where_;      // under watch_mu_
  std::thread watch_thread_;
  std::mutex gil_mu_;
  std::condition_variable gil_cv_;
  std::deque<std::shared_ptr<GilJob>> gil_jobs_;  // under gil_mu_
  std::thread gil_thread_;
  std::atomic<bool> stop_watch_{false};
  pthread_t main_thread_{};
  int stack_pipe_ = -1;    // read end of the faulthandler pipe
  int stack_signal_ = 0;   // the signal faulthandler dumps the main thread's stack on
};

// Adds the pxfabric package location to sys.path and imports the heavy modules (IPython,
// ipyparallel, pxfabric.engine). Throws py::error_already_set on failure.
void import_engine_modules();

} // namespace pxf::mpi
