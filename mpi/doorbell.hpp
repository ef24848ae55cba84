#pragma once
// Doorbells: wake-ups between rank 0 and the ranks on its node, so an idle rank can sleep in
// ppoll instead of polling MPI.
//
// MPI cannot wake a sleeping process: a rank waiting for its next request either spins in the
// progress engine or polls it on a timer. On the gateway's node, each rank binds an abstract
// unix datagram socket ("\0pxf-<token>-<rank>", no file, gone with the process); whoever
// posts an MPI send to a rank there (or starts a broadcast) also sends it a one-byte datagram.
// MPI still carries every byte of every message; a ring only says "look now". Ranks elsewhere,
// or when a socket cannot be made or reached (another network namespace, say), are not rung
// and keep polling on the timer.
//
// Only the node peers of this job can ring: a datagram's sender is checked (SO_PASSCRED: the
// kernel attaches the sender's pid; it must be one of the job's ranks on this node). Abstract
// sockets have no permissions and their names are visible in /proc/net/unix, so anyone else's
// datagram (a forged count would keep a rank polling for messages that never come) is dropped
// and reported.
//
// Rings are checked once at start-up: rank 0 rings every node peer and each peer rings rank 0;
// a direction counts only if the test ring arrived. Local unix datagrams are delivered
// synchronously, refused, or (queue full) retried, so the check is exact.
#include <mpi.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstdint>
#include <vector>

namespace pxf::mpi {

class Doorbells {
 public:
  // Collective over `comm` (every rank calls it, in the same order as other collectives).
  // Never fails: problems leave rings off where they occur.
  Doorbells(MPI_Comm comm, int rank, int size);
  ~Doorbells();
  Doorbells(const Doorbells&) = delete;
  Doorbells& operator=(const Doorbells&) = delete;

  // Readable when rung; -1 without a socket.
  int fd() const { return fd_; }
  // Every message this rank waits for comes with a ring: rank 0 when every other rank can
  // ring it; another rank when rank 0 can.
  bool woken_by_rings() const { return woken_by_rings_; }
  // Whether ring(rank) reaches `rank`.
  bool reaches(int rank) const {
    return rank >= 0 && static_cast<std::size_t>(rank) < reach_.size() && reach_[static_cast<std::size_t>(rank)];
  }
  // What a ring announces. A message: already visible to MPI_Improbe. A broadcast: an Ibcast
  // was started, which may reach this rank through relays (other ranks' progress), so the rank
  // keeps polling until it has completed one more broadcast.
  enum Kind : char { kMessage = 'm', kBroadcast = 'b' };
  // Non-blocking. False when the ring did not go out but may later (the receiver's queue is full:
  // net.unix.max_dgram_qlen, 10 by default); the caller retries, since receivers count rings.
  // `count` messages at once: one datagram, the kind byte then the count (uint16, little-endian)
  // when above 1.
  bool ring(int rank, Kind kind = kMessage, int count = 1);
  struct Rung {
    int messages = 0, broadcasts = 0;
    bool any() const { return messages + broadcasts > 0; }
  };
  // Consumes pending rings.
  Rung drain();

 private:
  bool send_to(int rank, char kind, int count = 1);
  // One datagram from a node peer into `b`: its size, or -1 when none is left. Datagrams from
  // anyone else are dropped (counted, logged) on the way.
  long receive(unsigned char* b, std::size_t cap);

  struct Address {
    sockaddr_un sun{};
    socklen_t len = 0;
  };
  int fd_ = -1;
  std::uint64_t token_ = 0;
  std::vector<Address> addr_;  // of the node's ranks (formatted once: rings are on the hot path)
  std::vector<bool> reach_;
  bool woken_by_rings_ = false;
  std::vector<int> peer_pids_;   // sorted pids of this job's ranks on this node
  std::uint64_t strangers_ = 0;  // datagrams dropped: not from a node peer
};

}  // namespace pxf::mpi
