#pragma once
// The broadcast scheduler (protocol §3.6): one request fans out to every target with
// msg_id "<original>_<uuid>"; replies are relayed one by one or coalesced into one.
// Targets that are ranks of a fabric job get ONE message per job; the gateway fans it out
// with an MPI broadcast and gathers coalescing replies with MPI (docs/fabric-link.md).
#include "controller/engines.hpp"
#include "controller/event_loop.hpp"

#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace pxf::controller {

class Relays;

class BroadcastScheduler {
 public:
  // Requests come in and replies go out on `bcast_in` (clients); stock engines are on
  // `bcast_out`, fabric jobs on `fabric`. Refusals are built by `relays` (reject_request).
  BroadcastScheduler(EventLoop& loop, EngineTable& engines, Relays& relays, zmq::socket_t& bcast_in,
                     zmq::socket_t& bcast_out, zmq::socket_t& fabric);

  // Client submits: [C, DELIM, ...] with metadata.targets = [[uuid, id], ...].
  void on_broadcast_submit(Frames&& frames);
  // An engine's reply: [E, C, DELIM, ...] (from a stock engine, or a rank through its gateway).
  void on_broadcast_reply(Frames&& frames);
  // A job's coalesced reply for its ranks: [C, DELIM, ...] with metadata.broadcast_targets.
  void on_coalesced_part(const std::string& job, Frames&& frames);
  // Coalescing broadcasts stop waiting for an engine gone (for a job, for the part that
  // covers it).
  void engine_gone(const std::string& uuid);

 private:
  // A coalescing broadcast waits for one reply per part: a stock engine (one target) or a
  // fabric job (all of its targets, gathered over MPI by the gateway).
  struct BroadcastPart {
    std::string job;                                   // "" for a stock engine
    std::vector<std::pair<std::string, int>> targets;  // (uuid, id) in request order
    std::optional<Message> reply;
    bool done = false;  // replied, or its engine(s) died
  };
  struct Broadcast {
    std::string client;
    std::vector<BroadcastPart> parts;
    std::size_t remaining = 0;
    std::optional<std::size_t> last;  // part of the last reply received
  };
  void part_done(const std::string& orig_id, Broadcast& b, std::size_t part);
  Broadcast* find_broadcast(const std::string& orig_id);  // counts an unexpected reply if none
  void emit_coalesced(const std::string& orig_id, Broadcast& b);

  EventLoop& loop_;
  Counters& counters_;
  EngineTable& engines_;
  Relays& relays_;
  zmq::socket_t& bcast_in_;
  zmq::socket_t& bcast_out_;
  zmq::socket_t& fabric_;
  std::unordered_map<std::string, Broadcast> broadcasts_;  // coalescing, by original msg_id
};

}  // namespace pxf::controller
