#pragma once
// Direct (mux) and control relays, and the iopub relay (protocol §3.2, §3.3, §3.5).
#include "controller/engines.hpp"
#include "controller/event_loop.hpp"
#include "controller/records.hpp"

namespace pxf::controller {

class Hub;
class JobLink;

class Relays {
 public:
  // Clients are on mux_in/control_in and iopub_out; engines are reached through `link`.
  // A shutdown_reply on iopub unregisters its engine through `hub`.
  Relays(EventLoop& loop, EngineTable& engines, TaskRecords& records, JobLink& link, Hub& hub, zmq::socket_t& mux_in,
         zmq::socket_t& control_in, zmq::socket_t& iopub_out);

  // Client -> engine: [C, E, DELIM, ...] arrives; [E, C, DELIM, ...] leaves.
  void on_client_direct(Frames&& frames, bool control);
  // Engine -> client: [E, C, DELIM, ...] arrives; [C, E, DELIM, ...] leaves.
  void on_engine_direct(Frames&& frames, bool control);
  // Engine output, forwarded verbatim to every client after its signature checks out.
  void on_iopub(Frames&& frames);

  // Answers request `m` of `client` on `s` with an error reply (`<type>_reply`, metadata
  // status error) in the controller's name; the broadcast scheduler refuses with it too.
  void reject_request(zmq::socket_t& s, zmq::message_t client, Message& m, const json& content, const char* channel);

 private:
  EventLoop& loop_;
  Counters& counters_;
  EngineTable& engines_;
  TaskRecords& records_;
  JobLink& link_;
  Hub& hub_;
  zmq::socket_t& mux_in_;
  zmq::socket_t& control_in_;
  zmq::socket_t& iopub_out_;
};

}  // namespace pxf::controller
