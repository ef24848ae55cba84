#pragma once
// Diagnosis of a rank that an interrupt does not free (a hung collective), and the answers to
// `pxf_where_request` (`pxcluster where`). Both run on the watch thread, which never waits for
// the GIL for long: the main thread may hold it inside native code. Python work goes to the
// GIL thread with a deadline; past it, the main thread's stack comes from faulthandler
// (a signal whose handler writes the stack into a pipe without the GIL).
//
// PyHost tells the watch what the main thread runs (request_started/finished, from the main
// thread) and what arrives for it (signal_requested, where_requested, from the fabric thread);
// the watch calls back into Python only through Host, on its GIL thread.
#include "mpi/fabric.hpp"
#include "wire/session.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
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

class RankWatch {
 public:
  // What the watch needs from the rank's Python side.
  class Host {
   public:
    virtual ~Host() = default;
    // GIL held (the GIL thread): pxf_where_reply's content (JSON) from the runtime, given the
    // watch's `info` (JSON: rank, state, running_for, ...).
    virtual std::string where_state(const std::string& info) = 0;
    // GIL held (the GIL thread): publishes the stuck-rank report (JSON `info`) on the rank's
    // stderr, as a child of the request header `parent`.
    virtual void stuck_report(const std::string& info, const std::string& parent) = 0;
    // Any thread: a signed message for the controller.
    virtual void post(Frames&& frames) = 0;
  };

  // `session` signs the replies the watch builds itself (encode is safe from any thread).
  // `interrupt_grace`: seconds an interrupt may take to return the rank to Python before the
  // rank reports where it is stuck; 0 = never report.
  RankWatch(int rank, int engine_id, std::string uuid, double interrupt_grace, const wire::Session& session,
            Host& host);
  ~RankWatch();
  RankWatch(const RankWatch&) = delete;
  RankWatch& operator=(const RankWatch&) = delete;

  // The signal faulthandler dumps the main thread's stack on (PyHost registers it).
  static int stack_signal();
  // Main thread: starts the watch and GIL threads. `stack_pipe`: the read end of the
  // faulthandler pipe (-1: no stack dumps without the GIL).
  void start(int stack_pipe);
  // Without the GIL (the GIL thread may be waiting for it): stops and joins both threads.
  void stop();

  // Main thread: a shell request starts / ends (the running state the watch reads).
  void request_started(const std::string& parent, const std::string& msg_type);
  void request_finished();
  // Main thread, in the SIGINT handler: the interrupt reached Python.
  void interrupt_landed();
  // Fabric thread: a signal_request arrived (a SIGINT to a busy rank arms a stuck check).
  void signal_requested(const zmq::message_t& content);
  // Fabric thread: a pxf_where_request arrived; answered on the watch thread.
  void where_requested(Frames&& route, std::string parent);

 private:
  struct Running {
    std::uint64_t seq = 0;  // shell requests started so far
    bool busy = false;
    std::string parent;  // header JSON of the running shell request
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
  struct WhereRequest {
    Frames route;
    std::string parent;
  };
  struct GilJob;

  void watch_loop();
  void gil_loop();
  // Runs fn on the GIL thread; false if it did not get the GIL (and finish) within `wait`.
  bool with_gil_for(std::chrono::milliseconds wait, std::function<void()> fn);
  void answer_where(WhereRequest& w);
  void report_stuck(const Running& r);
  // The main thread's Python stack without the GIL (faulthandler); "" if it did not answer.
  std::string native_stack();
  Running running();

  const int rank_, engine_id_;
  const std::string uuid_;
  const double interrupt_grace_;
  const wire::Session& session_;
  Host& host_;

  std::mutex run_mu_;
  Running run_;  // under run_mu_
  std::mutex watch_mu_;
  std::condition_variable watch_cv_;
  std::vector<Watch> watches_;      // under watch_mu_
  std::deque<WhereRequest> where_;  // under watch_mu_
  std::thread watch_thread_;
  std::mutex gil_mu_;
  std::condition_variable gil_cv_;
  std::deque<std::shared_ptr<GilJob>> gil_jobs_;  // under gil_mu_
  std::thread gil_thread_;
  std::atomic<bool> stop_{false};
  pthread_t main_thread_{};
  int stack_pipe_ = -1;  // read end of the faulthandler pipe
};

}  // namespace pxf::mpi
