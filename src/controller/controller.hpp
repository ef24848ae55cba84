#pragma once
// pxcontroller: hub, direct/control relays, load-balanced and broadcast schedulers, the iopub
// relay and the heartbeat, in one process with one event loop (protocol §3-§8).
//
// The Controller owns the sockets and the components and wires them together:
//   EventLoop (event_loop.hpp)            epoll over the sockets, decode/send, counters
//   Hub (hub.hpp)                         registration socket: engines, queries, notifications
//   TaskScheduler (scheduler.hpp)         load-balanced tasks
//   BroadcastScheduler (broadcast_scheduler.hpp)  fan-out and coalescing
//   Relays (relays.hpp)                   mux, control and iopub relays
//   JobLink (job_link.hpp)                the fabric link to MPI jobs; the way to any engine
//   HeartMonitor (heart_monitor.hpp)      stock engines' heartbeat
//   HeapTrim (heap_trim.hpp)              giving freed heap back when quiet
//
// Concurrency: everything runs on the thread that calls run(); request_stop() may be called
// from a signal handler.
#include "conn/connection_file.hpp"
#include "conn/profile.hpp"
#include "controller/broadcast_scheduler.hpp"
#include "controller/buffer_copier.hpp"
#include "controller/engines.hpp"
#include "controller/event_loop.hpp"
#include "controller/heap_trim.hpp"
#include "controller/heart_monitor.hpp"
#include "controller/hub.hpp"
#include "controller/job_link.hpp"
#include "controller/options.hpp"
#include "controller/records.hpp"
#include "controller/relays.hpp"
#include "controller/scheduler.hpp"
#include "wire/session.hpp"

#include <atomic>
#include <memory>
#include <vector>

namespace pxf::controller {

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
  struct Dispatch;  // what the event loop reads goes to the component that serves it

  zmq::socket_t make_router(const char* routing_id);
  int bind(zmq::socket_t& s, const std::string& ip);
  void write_connection_files();
  void remove_connection_files();
  void on_timers();
  // --curve: failed CurveZMQ handshakes on the registration socket (every client and stock
  // engine starts there) and on the fabric port, counted and logged (a wrong curve_serverkey,
  // or a peer without CurveZMQ, is refused by libzmq and never reaches a handler).
  void drain_query_monitor();

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
  // Disconnect events of the fabric ROUTER (zmq_socket_monitor), read by the job link.
  zmq::socket_t fabric_monitor_;
  zmq::socket_t query_monitor_;

  // Components, in construction order; a reference to one constructed later is only stored.
  EventLoop loop_;
  EngineTable engines_;
  BufferCopier copier_;  // before records_: they hold a pointer to it
  TaskRecords records_;
  JobLink link_;
  TaskScheduler tasks_;
  Relays relays_;
  BroadcastScheduler broadcasts_;
  HeartMonitor heart_;
  Hub hub_;
  HeapTrim trim_;

  std::atomic<bool> stop_requested_{false};
  bool files_written_ = false;
};

}  // namespace pxf::controller
