#include "mpi/doorbell.hpp"

#include "util/log.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <random>
#include <cstdlib>
#include <string_view>

namespace pxf::mpi {

namespace {
constexpr const char* kLog = "fabric";

// Abstract-namespace address (leading NUL): no file to clean up, scoped to the network namespace.
socklen_t address_of(std::uint64_t token, int rank, sockaddr_un& a) {
  std::memset(&a, 0, sizeof a);
  a.sun_family = AF_UNIX;
  int n = std::snprintf(a.sun_path + 1, sizeof a.sun_path - 1, "pxf-%016llx-%d", static_cast<unsigned long long>(token),
                        rank);
  return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + static_cast<std::size_t>(n));
}
}  // namespace

Doorbells::Doorbells(MPI_Comm comm, int rank, int size)
    : addr_(static_cast<std::size_t>(size)),
      reach_(static_cast<std::size_t>(size), false) {
  if (size <= 1) return;
  const char* off = std::getenv("PXF_FABRIC_DOORBELLS");
  if (rank == 0 && !(off && std::string_view(off) == "0")) {
    std::random_device rd;
    token_ = (static_cast<std::uint64_t>(rd()) << 32) ^ rd() ^
             static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
             (static_cast<std::uint64_t>(::getpid()) << 16);
  }
  MPI_Bcast(&token_, 1, MPI_UINT64_T, 0, comm);  // 0: turned off on rank 0 ($PXF_FABRIC_DOORBELLS=0)

  // Which ranks share rank 0's node: only those can be rung (abstract sockets are node-local).
  MPI_Comm node;
  MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
  int node_size = 0;
  MPI_Comm_size(node, &node_size);
  std::vector<int> node_ranks(static_cast<std::size_t>(node_size));
  {
    MPI_Group g_node, g_all;
    MPI_Comm_group(node, &g_node);
    MPI_Comm_group(comm, &g_all);
    std::vector<int> local(static_cast<std::size_t>(node_size));
    for (int i = 0; i < node_size; ++i) local[static_cast<std::size_t>(i)] = i;
    MPI_Group_translate_ranks(g_node, node_size, local.data(), g_all, node_ranks.data());
    MPI_Group_free(&g_node);
    MPI_Group_free(&g_all);
  }
  MPI_Comm_free(&node);
  std::vector<int> pids(static_cast<std::size_t>(size));
  int me = static_cast<int>(::getpid());
  MPI_Allgather(&me, 1, MPI_INT, pids.data(), 1, MPI_INT, comm);
  for (int r : node_ranks) peer_pids_.push_back(pids[static_cast<std::size_t>(r)]);
  std::sort(peer_pids_.begin(), peer_pids_.end());
  bool with_root = false;
  for (int r : node_ranks) {
    with_root |= r == 0;
    auto& a = addr_[static_cast<std::size_t>(r)];
    a.len = address_of(token_, r, a.sun);
  }

  if (with_root && token_ != 0) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    const auto& a = addr_[static_cast<std::size_t>(rank)];
    int one = 1;
    if (fd_ >= 0 && (::setsockopt(fd_, SOL_SOCKET, SO_PASSCRED, &one, sizeof one) != 0 ||
                     ::bind(fd_, reinterpret_cast<const sockaddr*>(&a.sun), a.len) != 0)) {
      PXF_LOG(debug, kLog) << "doorbell: socket set-up failed (" << std::strerror(errno) << "); polling instead";
      ::close(fd_);
      fd_ = -1;
    }
  }

  // Test rings, rank 0 <-> each node peer: all bound before the first is sent; rank 0 drains its
  // queue (10 datagrams by default) while the peers' rings come in, until every peer is done.
  MPI_Barrier(comm);
  auto send_retrying = [&](int to) {
    for (int tries = 0; tries < 20000; ++tries) {  // ~2 s at most
      if (send_to(to, kMessage)) return true;
      if (errno != EAGAIN && errno != EWOULDBLOCK) return false;
      ::usleep(100);
    }
    return false;
  };
  int heard = 0;
  auto drain_count = [&] {
    unsigned char b[4];
    while (fd_ >= 0 && receive(b, sizeof b) >= 1) ++heard;
  };
  if (rank == 0) {
    if (fd_ >= 0)
      for (int r : node_ranks)
        if (r != 0) reach_[static_cast<std::size_t>(r)] = send_retrying(r);
    MPI_Request done;
    MPI_Ibarrier(comm, &done);
    for (int flag = 0; !flag;) {
      drain_count();
      MPI_Test(&done, &flag, MPI_STATUS_IGNORE);
      if (!flag) ::usleep(100);
    }
    drain_count();
  } else {
    if (fd_ >= 0) reach_[0] = send_retrying(0);
    MPI_Request done;
    MPI_Ibarrier(comm, &done);
    MPI_Wait(&done, MPI_STATUS_IGNORE);  // rank 0 rang before entering it
    drain_count();
  }
  woken_by_rings_ = rank == 0 ? heard == size - 1 : heard >= 1;
  int mine = woken_by_rings_ ? 1 : 0, all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_SUM, comm);
  if (rank == 0)
    PXF_LOG(debug, kLog) << "doorbells: " << all << " of " << size << " ranks woken by rings"
                         << (all == size ? "" : " (the others poll)");
}

Doorbells::~Doorbells() {
  if (fd_ >= 0) ::close(fd_);
}

bool Doorbells::send_to(int rank, char kind, int count) {
  const auto& a = addr_[static_cast<std::size_t>(rank)];
  unsigned char b[3] = {static_cast<unsigned char>(kind), static_cast<unsigned char>(count & 0xff),
                        static_cast<unsigned char>((count >> 8) & 0xff)};
  std::size_t n = count > 1 ? 3 : 1;
  return ::sendto(fd_, b, n, MSG_DONTWAIT | MSG_NOSIGNAL, reinterpret_cast<const sockaddr*>(&a.sun), a.len) ==
         static_cast<ssize_t>(n);
}

bool Doorbells::ring(int rank, Kind kind, int count) {
  if (!reaches(rank)) return true;
  if (send_to(rank, kind, count)) return true;
  if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
  reach_[static_cast<std::size_t>(rank)] = false;  // gone (ECONNREFUSED): stop trying
  return true;
}

Doorbells::Rung Doorbells::drain() {
  Rung r;
  if (fd_ < 0) return r;
  unsigned char b[4];
  for (;;) {
    auto n = receive(b, sizeof b);
    if (n < 1) break;
    int count = n >= 3 ? (b[1] | (b[2] << 8)) : 1;
    if (b[0] == kBroadcast) r.broadcasts += count;
    else r.messages += count;
  }
  return r;
}

long Doorbells::receive(unsigned char* b, std::size_t cap) {
  for (;;) {
    iovec iov{b, cap};
    alignas(cmsghdr) char ctrl[CMSG_SPACE(sizeof(ucred))];
    msghdr m{};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = ctrl;
    m.msg_controllen = sizeof ctrl;
    ssize_t n = ::recvmsg(fd_, &m, 0);
    if (n < 0) return -1;
    ucred who{-1, static_cast<uid_t>(-1), static_cast<gid_t>(-1)};
    for (cmsghdr* h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h))
      if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_CREDENTIALS) std::memcpy(&who, CMSG_DATA(h), sizeof who);
    if (who.pid > 0 && std::binary_search(peer_pids_.begin(), peer_pids_.end(), static_cast<int>(who.pid)))
      return static_cast<long>(n);
    if (++strangers_ <= 3 || strangers_ % 10000 == 0)
      PXF_LOG(warning, kLog) << "doorbell: ignored a datagram from pid " << who.pid << " (uid "
                             << static_cast<long>(who.uid) << "), not a rank of this job on this node (#" << strangers_
                             << ")";
  }
}

}  // namespace pxf::mpi
