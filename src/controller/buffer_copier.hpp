#pragma once
// Private copies of large record buffers, made off the event loop's thread.
//
// Task records keep the buffers of requests and replies (as the stock DictDB does, up to
// --DictDB.size_limit). Keeping the received frames themselves would pin them: every next
// large message then needs fresh memory, and first-touch page faults land on the relay's
// critical path (a 10 MB pull from 8 ranks took 350 ms instead of 110 ms). Instead a record
// first shares the frame, this thread copies it, and the event loop swaps the copy in, so the
// received frame is freed once sent and its memory is reused for the next message.
//
// Identical buffers are kept once: a push to every engine carries the same array in one
// message per engine, and N copies of it would cost N times the memory. Fresh memory is what
// is dear here (first-touch page faults, up to ~12 µs per 4 KiB page on this VM: 64 MB costs
// about 200 ms), comparing is cheap (a sampled check, then memcmp).
#include <zmq.hpp>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstddef>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace pxf::controller {

class BufferCopier {
 public:
  struct Job {
    std::string msg_id;
    bool result = false;  // result_buffers (else the request's buffers)
    std::size_t index = 0;
    std::uint64_t gen = 0;  // the record's buffer generation when submitted
    zmq::message_t shared;  // dropped by the worker once copied
    zmq::message_t copy;
  };

  BufferCopier();
  ~BufferCopier();
  BufferCopier(const BufferCopier&) = delete;
  BufferCopier& operator=(const BufferCopier&) = delete;

  // Readable (eventfd) when copies are done: call take_done().
  int fd() const { return fd_; }
  void submit(Job&& job);
  std::vector<Job> take_done();
  // Buffers that were found identical to a recent copy and share it.
  std::uint64_t reused() const { return reused_.load(std::memory_order_relaxed); }

 private:
  void run();
  zmq::message_t copy_or_reuse(zmq::message_t& m);

  // The last copies made (shared with the records), for reuse by an identical buffer: enough
  // for a scatter's partitions to meet the gather that brings them back unchanged.
  static constexpr std::size_t kRecent = 16;
  static constexpr std::size_t kRecentBytes = std::size_t{256} << 20;
  std::deque<zmq::message_t> recent_;  // worker thread only
  std::atomic<std::uint64_t> reused_{0};

  int fd_ = -1;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> todo_, done_;
  bool stop_ = false;
  std::thread thread_;  // last: started once every member above exists
};

}  // namespace pxf::controller
