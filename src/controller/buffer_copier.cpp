#include "controller/buffer_copier.hpp"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "wire/message.hpp"

namespace pxf::controller {

BufferCopier::BufferCopier() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)), thread_([this] { run(); }) {}

BufferCopier::~BufferCopier() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (fd_ >= 0) ::close(fd_);
}

void BufferCopier::submit(Job&& job) {
  {
    std::lock_guard lock(mu_);
    todo_.push_back(std::move(job));
  }
  cv_.notify_one();
}

std::vector<BufferCopier::Job> BufferCopier::take_done() {
  std::uint64_t n;
  [[maybe_unused]] auto r = ::read(fd_, &n, sizeof n);
  std::vector<Job> out;
  std::lock_guard lock(mu_);
  while (!done_.empty()) {
    out.push_back(std::move(done_.front()));
    done_.pop_front();
  }
  return out;
}

void BufferCopier::run() {
  for (;;) {
    Job job;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !todo_.empty(); });
      if (stop_) return;
      job = std::move(todo_.front());
      todo_.pop_front();
    }
    job.copy = copy_or_reuse(job.shared);
    job.shared = zmq::message_t();  // the frame may now be freed (and its memory reused) once sent
    {
      std::lock_guard lock(mu_);
      done_.push_back(std::move(job));
    }
    std::uint64_t one = 1;
    [[maybe_unused]] auto w = ::write(fd_, &one, sizeof one);
  }
}

namespace {
bool same_bytes(const zmq::message_t& a, const zmq::message_t& b) {
  std::size_t n = a.size();
  if (n != b.size()) return false;
  const auto* p = static_cast<const unsigned char*>(a.data());
  const auto* q = static_cast<const unsigned char*>(b.data());
  std::size_t edge = std::min<std::size_t>(n, 4096);
  // Different data of one size (scatter's partitions) mostly differs at either end.
  if (std::memcmp(p, q, edge) != 0 || std::memcmp(p + n - edge, q + n - edge, edge) != 0) return false;
  return std::memcmp(p, q, n) == 0;
}
}  // namespace

zmq::message_t BufferCopier::copy_or_reuse(zmq::message_t& m) {
  for (auto& r : recent_)
    if (same_bytes(r, m)) {
      ++reused_;
      return wire::share(r);
    }
  zmq::message_t copy(m.data(), m.size());
  recent_.push_front(wire::share(copy));
  std::size_t bytes = 0;
  std::size_t keep = 0;
  while (keep < recent_.size() && keep < kRecent && bytes + recent_[keep].size() <= kRecentBytes)
    bytes += recent_[keep++].size();
  recent_.resize(std::max<std::size_t>(keep, 1));
  return copy;
}

}  // namespace pxf::controller
