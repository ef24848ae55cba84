#pragma once
// Rank 0's end of the fabric link (docs/fabric-link.md): one DEALER (routing id = job uuid) to
// the controller's fabric port; registration of every rank at once; per-job heartbeats;
// routing of requests to ranks and of the ranks' replies / iopub back to the controller;
// gathering of coalescing broadcast replies into one `bcast_coalesced` message.
//
// Threading: after register_job() (any one thread), everything runs on the fabric thread of
// rank 0. Nothing here knows about MPI: the caller supplies a Sink.
#include "gateway/curve_client.hpp"
#include "gateway/heart.hpp"
#include "link/protocol.hpp"
#include "wire/session.hpp"

#include <zmq.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace pxf::gateway {

using wire::Frames;
using wire::json;

class GatewayError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct RankInfo {
  std::string uuid;
  std::string hostname;
};

struct GatewayOptions {
  std::string url;  // tcp://host:pxf_fabric
  std::string job_uuid;
  wire::SessionOptions session;  // key + scheme; session_id = job uuid
  int register_timeout_ms = 10000;
  int max_heartbeat_misses = 10;
  std::string curve_serverkey;  // the connection file's curve_serverkey; "" = no CurveZMQ
};

// What the gateway needs from the MPI side.
class Sink {
 public:
  virtual ~Sink() = default;
  // A link-format message ([channel, E, C..., <IDS|MSG>, ...]) for one rank.
  virtual void to_rank(int rank, Frames&& frames) = 0;
  // A `bcast` message for every rank of the job.
  virtual void to_all(Frames&& frames) = 0;
  // End the job: every rank finalises MPI and exits with `code`.
  virtual void end_job(int code, const std::string& reason) = 0;
};

class Gateway {
 public:
  Gateway(zmq::context_t& ctx, GatewayOptions opts);

  // Sends pxf_register_request for all ranks and waits for the reply. Returns the engine id of
  // each rank. Throws GatewayError with a message meant for the user.
  std::vector<int> register_job(const std::vector<RankInfo>& ranks);

  int hb_period_ms() const { return hb_period_ms_; }
  // ZMQ_FD of the link socket, and whether a message may be waiting (check before sleeping).
  // As in the controller's loop: after a receive found nothing, only the fd's edge (told with
  // fd_signalled) or a send of ours (which can consume that edge) makes it worth asking libzmq
  // again; every asking costs a poll() and a getpid() in libzmq.
  int fd();
  bool maybe_readable() const { return maybe_readable_; }
  void fd_signalled() { maybe_readable_ = true; }

  // Receives and routes everything that is waiting on the link. Returns the number of messages.
  int poll_link(Sink& sink);
  // A message produced by a rank (any rank, rank 0 included): forwarded on the link, or taken
  // by the gateway (internal channels).
  void from_rank(Frames&& frames, Sink& sink);
  // The lost-controller check (the heartbeat itself runs on its own thread, gateway/heart.hpp).
  void tick(Sink& sink);
  // pxf_unregister for these ranks (skipping ones already unregistered).
  void unregister(const std::vector<int>& ranks, const std::string& reason);
  // Unregisters every rank still registered (job exit), then closes the socket (linger 2 s).
  void close(const std::string& reason);

  std::size_t size() const { return uuids_.size(); }
  int engine_id(int rank) const { return ids_.at(static_cast<std::size_t>(rank)); }

 private:
  struct Pending {  // one coalescing broadcast being gathered
    Frames client_route;
    std::vector<std::string> targets;               // uuids of this job, in metadata.targets order
    std::vector<json> target_pairs;                 // [uuid, id] as given
    std::unordered_map<std::string, Frames> parts;  // keyed by uuid; only awaited uuids
    std::unordered_set<std::string> awaited;        // targets whose part has not arrived
    std::int64_t started_ms = 0;
    // A target rank went down before replying: the controller has failed this broadcast
    // already (the client sees EngineError), so the other parts are collected and dropped.
    bool abandoned = false;
  };

  void send(Frames&& frames);
  void send_link(std::string_view msg_type, const json& content);
  void on_link_control(Frames&& frames, Sink& sink);
  void on_bcast(Frames&& frames, Sink& sink);
  void on_part(Frames&& frames);
  void finish_coalesced(const std::string& key, Pending& p);
  // A rank went down: pending coalescing broadcasts stop waiting for its part.
  void forget_rank(const std::string& uuid);

  GatewayOptions opts_;
  wire::Session session_;
  zmq::socket_t sock_;
  bool maybe_readable_ = true;
  std::vector<std::string> uuids_;
  std::vector<int> ids_;
  std::unordered_map<std::string, int> rank_of_;  // uuid -> rank
  std::vector<bool> registered_;
  zmq::context_t& ctx_;
  int hb_period_ms_ = 3000;
  std::unique_ptr<Heart> heart_;
  CurveClient curve_;
  bool ended_ = false;
  std::map<std::string, Pending> coalescing_;
};

// The key that ties a coalescing broadcast's parts together: metadata.original_msg_id, or the
// header's msg_id when absent. Ranks and the gateway must agree on it.
std::string bcast_key(const json& header, const json& metadata);

}  // namespace pxf::gateway
