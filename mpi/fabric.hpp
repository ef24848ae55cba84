#pragma once
// The fabric thread of one rank: moves messages between this rank and rank 0 over MPI (and, on
// rank 0, between the ranks and the controller through the Gateway). Never touches Python.
//
// MPI use, all on private duplicates of MPI_COMM_WORLD:
//   p2p comm,  tag kTagFrames: one packet (packet.hpp) = one link-format message, rank 0 <-> rank r
//   coll comm, MPI_Ibcast from rank 0: header {u64 len, u64 flags} then the packet in <=1 GiB
//              chunks (flags kBcastExit: job ends, len = exit code, no data)
// Waiting: ppoll on an eventfd (outgoing work), the doorbell socket (doorbell.hpp) and, on rank 0,
// the link socket's ZMQ_FD. A rank whose incoming messages all come with a ring polls MPI only
// while its own operations are in flight (sends, or a message or broadcast it was rung for and
// has not received yet: Ibcast data may arrive through relays), with timeouts idle/2 from 20 us to 1 ms, and
// otherwise sleeps until rung (100 ms at most); it makes MPI calls only then (each MPI call that
// finds nothing is a sched_yield under mpi_yield_when_idle). Other ranks poll on a timer: 200 us of
// sched_yield after traffic, then idle/8 capped at 1 ms, and 10 ms after 200 ms of quiet.
#include "gateway/gateway.hpp"
#include "mpi/doorbell.hpp"
#include "mpi/packet.hpp"
#include "wire/frames.hpp"

#include <mpi.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace pxf::mpi {

using wire::Frames;

// The rank's engine (PyHost): receives requests, learns when the job ends.
class LocalRank {
 public:
  virtual ~LocalRank() = default;
  // A link-format message for this rank ([channel, ...route, <IDS|MSG>, ...]); `received` is
  // CLOCK_MONOTONIC seconds. Called on the fabric thread.
  virtual void deliver(Frames&& frames, double received) = 0;
  // The job is over (the fabric thread is stopping). Called on the fabric thread.
  virtual void job_ended(int code) = 0;
};

class Fabric final : public gateway::Sink {
 public:
  Fabric(MPI_Comm p2p, MPI_Comm coll, int rank, int size, gateway::Gateway* gw, LocalRank& local);
  ~Fabric() override;

  // Queues a message from this rank for the gateway (replies, iopub, internal). Any thread.
  // wake=false leaves the fabric thread asleep: the message goes with the next one posted with
  // a wake-up (or at the thread's next timeout, at most 100 ms), e.g. a request's status
  // messages with its reply: one wake-up, one MPI round, one ring instead of three.
  void post(Frames&& frames, bool wake = true);
  // Wakes the fabric thread if messages were posted without a wake-up since the last one.
  void wake_if_quiet_posts();
  void start();
  void join();
  int exit_code() const { return exit_code_.load(); }
  // The signal that ended the job on this rank (0 if none): see watch_termination().
  int terminated_by() const { return terminated_by_.load(); }
  // Rank 0: SIGTERM/SIGHUP make the fabric thread unregister every engine of the job at once
  // and end it without MPI traffic (mpirun, Slurm or a user is tearing the job down; other
  // ranks may already be gone). Call once, after start-up.
  void watch_termination();

  // gateway::Sink (rank 0, fabric thread)
  void to_rank(int rank, Frames&& frames) override;
  void to_all(Frames&& frames) override;
  void end_job(int code, const std::string& reason) override;

 private:
  struct Send {
    std::shared_ptr<std::vector<char>> data;
    std::unique_ptr<std::uint64_t[]> hdr;
    Frames frames;  // sent in place (large messages): kept alive until the send completes
    std::vector<MPI_Request> reqs;
  };

  void run();
  bool progress_sends();
  bool progress_recv(bool owed_only = false);
  bool progress_bcast_in();
  void post_bcast_header();
  void isend(int dest, Frames&& frames, bool ring_now = true);
  void ibcast_root(std::shared_ptr<std::vector<char>> data, std::uint64_t len, std::uint64_t flags);
  void ring(int rank, Doorbells::Kind kind, int count = 1);
  void retry_rings();
  void wait(std::int64_t timeout_us);
  void wake_thread();  // the fabric thread's eventfd
  std::int64_t next_wait_us(std::int64_t idle_us) const;
  bool in_flight() const;
  void drain_and_quiesce();
  // Rank 0 only: the SIGTERM/SIGINT watch_termination caught (0: none), recorded as how the job
  // ended (terminated_by_, exit code 128 + signal).
  int take_term_signal();

  MPI_Comm p2p_, coll_;
  int rank_, size_;
  gateway::Gateway* gw_;
  LocalRank& local_;
  int wake_fd_ = -1;
  Doorbells bells_;
  bool rung_ = false;                // a ring arrived during the last wait
  bool timed_out_ = false;           // the last wait ended by its timeout
  std::uint64_t bcasts_rung_ = 0;    // broadcast rings received (non-root)
  std::uint64_t bcasts_done_ = 0;    // broadcasts completed (non-root)
  std::uint64_t msgs_rung_ = 0;      // message rings received
  std::uint64_t msgs_received_ = 0;  // packets received (tag kTagFrames)
  struct Unrung {
    int rank;
    Doorbells::Kind kind;
    int count;
  };
  std::vector<Unrung> unrung_;  // rings to retry (receiver's queue full)
  bool quiet_posts_ = false;    // under mu_: posted without waking the thread
  std::uint64_t rings_retried_ = 0;

  std::mutex mu_;
  std::deque<Frames> outbox_;

  std::list<Send> sends_;
  // non-root broadcast receive state
  std::uint64_t in_hdr_[2] = {0, 0};
  MPI_Request in_hdr_req_ = MPI_REQUEST_NULL;
  std::shared_ptr<Packet> in_data_;
  std::vector<MPI_Request> in_data_reqs_;

  std::atomic<bool> ending_{false};
  std::atomic<int> exit_code_{0};
  std::atomic<int> terminated_by_{0};
  bool exit_sent_ = false;
  std::thread thread_;
};

double mono_seconds();

}  // namespace pxf::mpi
