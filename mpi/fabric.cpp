#include "mpi/fabric.hpp"

#include "mpi/packet.hpp"
#include "util/log.hpp"
#include "util/memory.hpp"

#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <utility>

namespace pxf::mpi {

namespace {
constexpr const char* kLog = "fabric";
constexpr int kTagFrames = 1;
constexpr std::uint64_t kBcastExit = 1;
constexpr std::uint64_t kChunk = std::uint64_t{1} << 30;
constexpr int kTagBulk = 2;                           // bulk frames of the last kTagFrames packet from the same source
constexpr std::size_t kBulkSendBytes = 256 * 1024;    // messages this large send big frames apart
constexpr std::size_t kBulkFrameBytes = 64 * 1024;    // ... frames this large
constexpr std::int64_t kTrimAfterIdleUs = 1'000'000;  // quiet this long: malloc_trim
constexpr std::int64_t kSpinUs = 200;                 // busy polling right after traffic (default)
constexpr std::int64_t kActiveSleepUs = 1000;         // cap while traffic is recent: <=1 ms added latency
constexpr std::int64_t kRecentUs = 200000;            // "recent": within the last 200 ms
constexpr std::int64_t kIdleSleepUs = 10000;          // cap once idle: ~100 wake-ups/s, <=10 ms latency
// With doorbells (every incoming message rings): poll only around traffic, then sleep until rung.
constexpr std::int64_t kRungMinSleepUs = 20;
constexpr std::int64_t kRungIdleUs = 100000;  // a safety net only: rings wake the rank

// $name as a count of microseconds, or `fallback` when unset (or not positive, if `positive`).
std::int64_t env_us(const char* name, std::int64_t fallback, bool positive) {
  const char* s = std::getenv(name);
  if (!s || !*s) return fallback;
  long long n = std::atoll(s);
  return positive && n <= 0 ? fallback : static_cast<std::int64_t>(n);
}

// Tuning knobs, read once: busy polling after traffic, and the longest sleep.
std::int64_t spin_us() {
  static const std::int64_t v = env_us("PXF_FABRIC_SPIN_US", kSpinUs, false);
  return v;
}
std::int64_t max_sleep_us(std::int64_t fallback) {
  static const std::int64_t v = env_us("PXF_FABRIC_MAX_SLEEP_US", 0, true);
  return v > 0 ? v : fallback;
}

// MPI cannot wake a sleeping rank, so a rank that is not rung (doorbell.hpp) polls: every <=1 ms
// while requests are flowing (a task stream, a %px loop), every <=10 ms after 200 ms of quiet (a
// person reading output). Rank 0 also wakes at once for the link socket and for its own rank's
// replies. $PXF_FABRIC_MAX_SLEEP_US overrides the idle cap (benchmarks, tuning).
std::int64_t sleep_cap_us(std::int64_t idle_us) {
  std::int64_t idle_cap = max_sleep_us(kIdleSleepUs);
  return idle_us < kRecentUs ? std::min(kActiveSleepUs, idle_cap) : idle_cap;
}

// Set by the termination handler (async-signal-safe: an atomic store and a write()).
std::atomic<int> g_term_signal{0};  // lock-free, so async-signal-safe
int g_term_wake_fd = -1;

extern "C" void on_termination_signal(int sig) {
  g_term_signal = sig;
  if (g_term_wake_fd >= 0) {
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(g_term_wake_fd, &one, sizeof one);
  }
}

std::int64_t now_us() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000 + ts.tv_nsec / 1000;
}

}  // namespace

double mono_seconds() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

Fabric::Fabric(MPI_Comm p2p, MPI_Comm coll, int rank, int size, gateway::Gateway* gw, LocalRank& local)
    : p2p_(p2p),
      coll_(coll),
      rank_(rank),
      size_(size),
      gw_(gw),
      local_(local),
      bells_(p2p, rank, size) {
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

Fabric::~Fabric() {
  join();
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

void Fabric::start() {
  thread_ = std::thread([this] { run(); });
}

void Fabric::watch_termination() {
  g_term_wake_fd = wake_fd_;
  struct sigaction sa {};
  sa.sa_handler = on_termination_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGHUP, &sa, nullptr);
}

void Fabric::join() {
  if (thread_.joinable()) thread_.join();
}

void Fabric::post(Frames&& frames, bool wake) {
  {
    std::lock_guard lock(mu_);
    outbox_.push_back(std::move(frames));
    quiet_posts_ = !wake;
  }
  if (wake) wake_thread();
}

void Fabric::wake_if_quiet_posts() {
  {
    std::lock_guard lock(mu_);
    if (!std::exchange(quiet_posts_, false)) return;
  }
  wake_thread();
}

void Fabric::wake_thread() {
  std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(wake_fd_, &one, sizeof one);
}

void Fabric::isend(int dest, Frames&& frames, bool ring_now) {
  std::size_t total = 4 + 8 * frames.size(), bulk = 0;
  for (const auto& f : frames) {
    total += f.size();
    if (f.size() >= kBulkFrameBytes) bulk += f.size();
  }
  std::size_t packet_bytes = total >= kBulkSendBytes ? total - bulk : total;
  if (packet_bytes > static_cast<std::size_t>(INT_MAX)) {
    PXF_LOG(error, kLog) << "message of " << total << " bytes has more than 2 GiB in small frames; dropped";
    return;
  }
  Send s;
  s.reqs.resize(1);
  if (total < kBulkSendBytes) {
    auto data = std::make_shared<std::vector<char>>(pack_frames(frames));
    MPI_Isend(data->data(), static_cast<int>(data->size()), MPI_BYTE, dest, kTagFrames, p2p_, &s.reqs[0]);
    s.data = std::move(data);
  } else {
    // Large: frames of kBulkFrameBytes or more leave the packet and follow it as contiguous
    // messages of their own, sent from the frames in place (no packing copy), which MPI moves
    // with one copy (CMA) instead of a fragment pipeline that needs this thread's progress.
    auto data = std::make_shared<std::vector<char>>(pack_frames(frames, kBulkFrameBytes));
    MPI_Isend(data->data(), static_cast<int>(data->size()), MPI_BYTE, dest, kTagFrames, p2p_, &s.reqs[0]);
    for (auto& f : frames) {
      if (f.size() < kBulkFrameBytes) continue;
      auto* p = static_cast<char*>(f.data());
      for (std::size_t off = 0; off < f.size(); off += kChunk) {
        int n = static_cast<int>(std::min<std::size_t>(kChunk, f.size() - off));
        s.reqs.emplace_back();
        MPI_Isend(p + off, n, MPI_BYTE, dest, kTagBulk, p2p_, &s.reqs.back());
      }
    }
    s.data = std::move(data);
    s.frames = std::move(frames);
  }
  sends_.push_back(std::move(s));
  if (ring_now) ring(dest, Doorbells::kMessage);
}

// A datagram carries a count of up to 0xffff; rings that do not go out (the receiver's queue
// is full) wait in unrung_, in order, and go first next time: receivers count them.
void Fabric::ring(int rank, Doorbells::Kind kind, int count) {
  for (; count > 0; count -= 0xffff) {
    int n = std::min(count, 0xffff);
    if (!unrung_.empty() || !bells_.ring(rank, kind, n)) {
      unrung_.push_back({rank, kind, n});
      ++rings_retried_;
    }
  }
}

void Fabric::retry_rings() {
  std::size_t k = 0;
  while (k < unrung_.size() && bells_.ring(unrung_[k].rank, unrung_[k].kind, unrung_[k].count)) ++k;
  unrung_.erase(unrung_.begin(), unrung_.begin() + static_cast<std::ptrdiff_t>(k));
}

void Fabric::ibcast_root(std::shared_ptr<std::vector<char>> data, std::uint64_t len, std::uint64_t flags) {
  Send s;
  s.hdr.reset(new std::uint64_t[2]{len, flags});
  s.reqs.emplace_back();
  MPI_Ibcast(s.hdr.get(), 2, MPI_UINT64_T, 0, coll_, &s.reqs.back());
  if (data) {
    for (std::uint64_t off = 0; off < data->size(); off += kChunk) {
      int n = static_cast<int>(std::min<std::uint64_t>(kChunk, data->size() - off));
      s.reqs.emplace_back();
      MPI_Ibcast(data->data() + off, n, MPI_BYTE, 0, coll_, &s.reqs.back());
    }
  }
  s.data = std::move(data);
  sends_.push_back(std::move(s));
  for (int r = 1; r < size_; ++r) ring(r, Doorbells::kBroadcast);
}

void Fabric::to_rank(int rank, Frames&& frames) {
  if (rank == rank_) {
    local_.deliver(std::move(frames), mono_seconds());
    return;
  }
  isend(rank, std::move(frames));
}

void Fabric::to_all(Frames&& frames) {
  if (size_ > 1) {
    auto data = std::make_shared<std::vector<char>>(pack_frames(frames));
    auto len = data->size();
    ibcast_root(std::move(data), len, 0);
  }
  local_.deliver(std::move(frames), mono_seconds());
}

void Fabric::end_job(int code, const std::string& reason) {
  if (ending_.exchange(true)) return;
  PXF_LOG(info, kLog) << "ending the job (exit code " << code << "): " << reason;
  exit_code_ = code;
  if (size_ > 1 && !exit_sent_) {
    exit_sent_ = true;
    ibcast_root(nullptr, static_cast<std::uint64_t>(code), kBcastExit);
  }
}

bool Fabric::progress_sends() {
  bool any = false;
  for (auto it = sends_.begin(); it != sends_.end();) {
    int done = 0;
    MPI_Testall(static_cast<int>(it->reqs.size()), it->reqs.data(), &done, MPI_STATUSES_IGNORE);
    if (done) {
      it = sends_.erase(it);
      any = true;
    } else {
      ++it;
    }
  }
  return any;
}

bool Fabric::progress_recv(bool owed_only) {
  bool any = false;
  for (int i = 0; i < 64; ++i) {
    if (owed_only && msgs_received_ >= msgs_rung_) break;  // no last probe that finds nothing
    int flag = 0;
    MPI_Message msg;
    MPI_Status st;
    MPI_Improbe(MPI_ANY_SOURCE, kTagFrames, p2p_, &flag, &msg, &st);
    if (!flag) break;
    int count = 0;
    MPI_Get_count(&st, MPI_BYTE, &count);
    auto buf = std::make_shared<Packet>(static_cast<std::size_t>(count));
    MPI_Mrecv(buf->data(), count, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
    any = true;
    ++msgs_received_;
    Frames frames;
    std::vector<std::size_t> bulk;
    try {
      frames = unpack_frames(buf, &bulk);
    } catch (const std::exception& e) {
      PXF_LOG(error, kLog) << "bad packet from rank " << st.MPI_SOURCE << ": " << e.what();
      continue;
    }
    // Its bulk frames follow from the same source, in order (MPI keeps per-source order).
    for (std::size_t i : bulk) {
      auto* p = static_cast<char*>(frames[i].data());
      for (std::size_t off = 0; off < frames[i].size(); off += kChunk) {
        int n = static_cast<int>(std::min<std::size_t>(kChunk, frames[i].size() - off));
        MPI_Recv(p + off, n, MPI_BYTE, st.MPI_SOURCE, kTagBulk, p2p_, MPI_STATUS_IGNORE);
      }
    }
    double received = mono_seconds();
    if (rank_ == 0) {
      gw_->from_rank(std::move(frames), *this);
    } else if (!ending_) {
      local_.deliver(std::move(frames), received);
    }
  }
  return any;
}

void Fabric::post_bcast_header() {
  in_hdr_[0] = in_hdr_[1] = 0;
  MPI_Ibcast(in_hdr_, 2, MPI_UINT64_T, 0, coll_, &in_hdr_req_);
}

bool Fabric::progress_bcast_in() {
  if (in_hdr_req_ != MPI_REQUEST_NULL) {
    int done = 0;
    MPI_Test(&in_hdr_req_, &done, MPI_STATUS_IGNORE);
    if (!done) return false;
    if (in_hdr_[1] & kBcastExit) {
      ++bcasts_done_;
      exit_code_ = static_cast<int>(in_hdr_[0]);
      ending_ = true;
      return true;
    }
    in_data_ = std::make_shared<Packet>(in_hdr_[0]);
    in_data_reqs_.clear();
    for (std::uint64_t off = 0; off < in_data_->size(); off += kChunk) {
      int n = static_cast<int>(std::min<std::uint64_t>(kChunk, in_data_->size() - off));
      in_data_reqs_.emplace_back();
      MPI_Ibcast(in_data_->data() + off, n, MPI_BYTE, 0, coll_, &in_data_reqs_.back());
    }
  }
  int done = 1;
  if (!in_data_reqs_.empty())
    MPI_Testall(static_cast<int>(in_data_reqs_.size()), in_data_reqs_.data(), &done, MPI_STATUSES_IGNORE);
  if (!done) return true;
  in_data_reqs_.clear();
  ++bcasts_done_;
  try {
    auto frames = unpack_frames(in_data_);
    local_.deliver(std::move(frames), mono_seconds());
  } catch (const std::exception& e) {
    PXF_LOG(error, kLog) << "bad broadcast packet: " << e.what();
  }
  in_data_.reset();
  post_bcast_header();
  return true;
}

void Fabric::wait(std::int64_t timeout_us) {
  pollfd fds[3];
  int n = 0;
  fds[n++] = {wake_fd_, POLLIN, 0};
  int bell = -1;
  if (bells_.fd() >= 0) {
    bell = n;
    fds[n++] = {bells_.fd(), POLLIN, 0};
  }
  int link = -1;
  if (gw_) {
    if (gw_->maybe_readable()) return;
    link = n;
    fds[n++] = {gw_->fd(), POLLIN, 0};
  }
  timespec ts{static_cast<time_t>(timeout_us / 1000000), static_cast<long>(timeout_us % 1000000) * 1000};
  if (::ppoll(fds, static_cast<nfds_t>(n), &ts, nullptr) == 0) {
    timed_out_ = true;
    if (gw_) gw_->fd_signalled();  // belt and braces, once per quiet wait
  }
  if (link >= 0 && (fds[link].revents & POLLIN)) gw_->fd_signalled();
  if (fds[0].revents & POLLIN) {
    std::uint64_t v;
    [[maybe_unused]] auto r = ::read(wake_fd_, &v, sizeof v);
  }
  if (bell >= 0 && (fds[bell].revents & POLLIN)) {
    auto r = bells_.drain();
    bcasts_rung_ += static_cast<std::uint64_t>(r.broadcasts);
    msgs_rung_ += static_cast<std::uint64_t>(r.messages);
    rung_ = r.any();
  }
}

// Rings count the messages and broadcasts sent to this rank, one each; a ring can come before
// MPI shows its message (a first probe after it often finds nothing), so the rank polls until
// it has received as many as it was rung for. A ring drained after its message was received
// leaves the counts equal; a lost ring (full socket buffer) only means the safety-net timeout.
bool Fabric::in_flight() const {
  return !sends_.empty() || !unrung_.empty() || !in_data_reqs_.empty() || bcasts_rung_ > bcasts_done_ ||
         msgs_rung_ > msgs_received_;
}

// How long to sleep after `idle_us` without traffic (see fabric.hpp, "Waiting").
std::int64_t Fabric::next_wait_us(std::int64_t idle_us) const {
  if (bells_.woken_by_rings()) {
    if (in_flight()) return std::clamp<std::int64_t>(idle_us / 2, kRungMinSleepUs, kActiveSleepUs);
    return max_sleep_us(kRungIdleUs);
  }
  return std::min(sleep_cap_us(idle_us), idle_us / 8);
}

void Fabric::run() {
  if (rank_ != 0 && size_ > 1) post_bcast_header();
  std::int64_t last = now_us();
  bool trim_due = false;
  while (!ending_) {
    bool busy = false;
    std::deque<Frames> out;
    {
      std::lock_guard lock(mu_);
      out.swap(outbox_);
    }
    if (rank_ == 0) {
      for (auto& f : out) gw_->from_rank(std::move(f), *this);
    } else if (!out.empty()) {
      for (auto& f : out) isend(0, std::move(f), false);
      ring(0, Doorbells::kMessage, static_cast<int>(out.size()));  // one ring for the batch
    }
    busy |= !out.empty();
    // Each MPI call that finds nothing makes Open MPI sched_yield (mpi_yield_when_idle), a
    // context switch on a busy node: a rank that is rung calls MPI only when a ring came, when
    // something of its own is in flight, or when its safety-net timeout expired.
    bool rung = std::exchange(rung_, false);
    if (!unrung_.empty()) retry_rings();
    // A rung rank makes only the calls it is owed: messages are probed for only while it was
    // rung for more than it received, the broadcast tested only while one is rung for or under
    // way (14 yields per execute before). Polling ranks, and any rank after its safety-net
    // timeout, make them all.
    bool all = !bells_.woken_by_rings() || std::exchange(timed_out_, false);
    if (all || !sends_.empty()) busy |= progress_sends();
    if (all || msgs_rung_ > msgs_received_) busy |= progress_recv(!all);
    if (rank_ != 0 && size_ > 1 && (all || bcasts_rung_ > bcasts_done_ || !in_data_reqs_.empty()))
      busy |= progress_bcast_in();
    busy |= rung;  // what was rung for is arriving: poll again at once, then at growing intervals
    if (rank_ == 0 && !ending_) {
      if (int sig = take_term_signal()) {
        // No MPI from here on: the other ranks may be dead already.
        PXF_LOG(warning, kLog) << "terminated by signal " << sig << ": unregistering every engine of the job";
        gw_->close("terminated by signal " + std::to_string(sig));
        ending_ = true;
        local_.job_ended(exit_code_);
        return;
      }
      busy |= gw_->poll_link(*this) > 0;
      gw_->tick(*this);
    }
    if (ending_) break;
    std::int64_t now = now_us();
    if (busy) {
      last = now;
      trim_due = true;
      continue;
    }
    std::int64_t idle = now - last;
    if (trim_due && idle >= kTrimAfterIdleUs) {  // freed heap back to the system (util/memory.hpp)
      trim_due = false;
      if (memory::worth_trimming()) memory::trim_heap();
    }
    if (!bells_.woken_by_rings() && idle < spin_us()) sched_yield();
    else wait(next_wait_us(idle));
  }
  drain_and_quiesce();
  PXF_LOG(debug, kLog) << "rings retried (receiver's queue full): " << rings_retried_;
  if (gw_) gw_->close("job exit");
  local_.job_ended(exit_code_);
}

// After the job ended: finish our own sends (rank 0 keeps receiving so they can complete), then
// an Ibarrier while still receiving, so no rank enters MPI_Finalize with traffic in flight.
// A SIGTERM to rank 0 while it waits here (Slurm's scancel signals every process of the job at
// once: the other ranks may be dead and never join the barrier) gives up the wait: the rank
// then dies of the signal without MPI_Finalize, as in run(), instead of hanging until SIGKILL.
int Fabric::take_term_signal() {
  int sig = rank_ == 0 ? g_term_signal.load() : 0;
  if (sig) {
    terminated_by_ = sig;
    exit_code_ = 128 + sig;
  }
  return sig;
}

void Fabric::drain_and_quiesce() {
  auto torn_down = [&] {
    int sig = take_term_signal();
    if (sig)
      PXF_LOG(warning, kLog) << "terminated by signal " << sig
                             << " while ending the job: not waiting for the other ranks";
    return sig != 0;
  };
  auto flush_outbox = [&] {
    std::deque<Frames> out;
    {
      std::lock_guard lock(mu_);
      out.swap(outbox_);
    }
    for (auto& f : out) {
      if (rank_ == 0) gw_->from_rank(std::move(f), *this);
      else isend(0, std::move(f));  // e.g. the last iopub before the end; rank 0 still receives
    }
  };
  flush_outbox();
  while (!sends_.empty()) {
    if (torn_down()) return;
    progress_sends();
    progress_recv();
    usleep(50);
  }
  MPI_Request barrier;
  MPI_Ibarrier(coll_, &barrier);
  for (;;) {
    int done = 0;
    MPI_Test(&barrier, &done, MPI_STATUS_IGNORE);
    if (done) break;
    if (torn_down()) return;
    progress_recv();
    progress_sends();
    usleep(100);
  }
  if (rank_ == 0) {
    std::deque<Frames> out;
    std::lock_guard lock(mu_);
    out.swap(outbox_);
    for (auto& f : out) gw_->from_rank(std::move(f), *this);
  }
}

}  // namespace pxf::mpi
