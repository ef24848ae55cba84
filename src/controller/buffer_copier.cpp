#include "controller/buffer_copier.hpp"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdint>

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
    job.copy = zmq::message_t(job.shared.data(), job.shared.size());
    job.shared = zmq::message_t();  // the frame may now be freed (and its memory reused) once sent
    {
      std::lock_guard lock(mu_);
      done_.push_back(std::move(job));
    }
    std::uint64_t one = 1;
    [[maybe_unused]] auto w = ::write(fd_, &one, sizeof one);
  }
}

} // namespace pxf::controller
