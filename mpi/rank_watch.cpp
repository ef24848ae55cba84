#include "mpi/rank_watch.hpp"

#include "link/protocol.hpp"
#include "util/log.hpp"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <sstream>

#include <poll.h>
#include <unistd.h>

namespace pxf::mpi {

namespace py = pybind11;

using wire::frame;
using wire::json;
using wire::view;

namespace {
constexpr const char* kLog = "engine";

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// The engine's own frames (the bridge, the runtime, IPython running a cell), which a user does
// not want to read: what python/pxfabric/stuck.py leaves out too.
bool internal_file(const std::string& file) {
  static const char* const kInternal[] = {"/pxfabric/", "/IPython/", "/ipykernel/", "/ipyparallel/", "/traitlets/"};
  if (file == "<string>") return true;
  for (const char* dir : kInternal)
    if (file.find(dir) != std::string::npos) return true;
  return false;
}

// faulthandler's `  File "x.py", line 3 in f` lines as frames, outermost first, without the
// engine's own frames.
json frames_of_dump(const std::string& dump) {
  json frames = json::array();
  std::istringstream in(dump);
  std::string line;
  while (std::getline(in, line)) {
    auto f = line.find("File \"");
    auto l = line.rfind("\", line ");
    if (f == std::string::npos || l == std::string::npos || l < f) continue;
    std::string file = line.substr(f + 6, l - f - 6);
    std::string rest = line.substr(l + 8);
    auto sp = rest.find(" in ");
    int lineno = std::atoi(rest.substr(0, sp).c_str());
    std::string func = sp == std::string::npos ? "?" : rest.substr(sp + 4);
    if (internal_file(file)) continue;
    frames.insert(frames.begin(), json{{"file", file}, {"line", lineno}, {"function", func}, {"code", ""}});
  }
  return frames;
}
}  // namespace

struct RankWatch::GilJob {
  std::function<void()> fn;
  std::mutex mu;
  std::condition_variable cv;
  bool started = false, done = false, abandoned = false;  // under mu
};

RankWatch::RankWatch(int rank, int engine_id, std::string uuid, double interrupt_grace, const wire::Session& session,
                     Host& host)
    : rank_(rank),
      engine_id_(engine_id),
      uuid_(std::move(uuid)),
      interrupt_grace_(interrupt_grace),
      session_(session),
      host_(host) {}

RankWatch::~RankWatch() { stop(); }

int RankWatch::stack_signal() { return SIGRTMIN + 7; }

void RankWatch::start(int stack_pipe) {
  main_thread_ = pthread_self();
  stack_pipe_ = stack_pipe;
  gil_thread_ = std::thread([this] { gil_loop(); });
  watch_thread_ = std::thread([this] { watch_loop(); });
}

void RankWatch::stop() {
  stop_ = true;
  {
    // no lost wake-up between a predicate check and the wait
    std::lock_guard l1(watch_mu_);
    std::lock_guard l2(gil_mu_);
  }
  watch_cv_.notify_all();
  gil_cv_.notify_all();
  if (watch_thread_.joinable()) watch_thread_.join();
  if (gil_thread_.joinable()) gil_thread_.join();
}

void RankWatch::request_started(const std::string& parent, const std::string& msg_type) {
  std::lock_guard lock(run_mu_);
  ++run_.seq;
  run_.busy = true;
  run_.parent = parent;
  run_.msg_type = msg_type;
  run_.since = std::chrono::steady_clock::now();
  run_.was_interrupted = false;
}

void RankWatch::request_finished() {
  std::lock_guard lock(run_mu_);
  run_.busy = false;
}

void RankWatch::interrupt_landed() {
  std::lock_guard lock(run_mu_);
  run_.landed = std::chrono::steady_clock::now();
}

RankWatch::Running RankWatch::running() {
  std::lock_guard lock(run_mu_);
  return run_;
}

void RankWatch::signal_requested(const zmq::message_t& content) {
  // Only SIGINT frees a rank that is running a request (other signals end the process).
  bool sigint = false;
  try {
    auto c = json::parse(view(content));
    auto it = c.find("sig");
    if (it != c.end()) {
      if (it->is_number_integer()) sigint = it->get<int>() == SIGINT;
      else if (it->is_string())
        sigint = it->get_ref<const std::string&>() == "SIGINT" ||
                 it->get_ref<const std::string&>() == std::to_string(SIGINT);
    }
  } catch (const std::exception&) {
    return;  // the control thread answers a malformed request
  }
  if (!sigint) return;
  auto now = std::chrono::steady_clock::now();
  std::uint64_t seq = 0;
  {
    std::lock_guard lock(run_mu_);
    if (!run_.busy) return;
    run_.interrupted = now;
    run_.was_interrupted = true;
    seq = run_.seq;
  }
  if (interrupt_grace_ <= 0) return;
  {
    std::lock_guard lock(watch_mu_);
    watches_.push_back({seq, now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                       std::chrono::duration<double>(interrupt_grace_))});
  }
  watch_cv_.notify_all();
}

void RankWatch::where_requested(Frames&& route, std::string parent) {
  {
    std::lock_guard lock(watch_mu_);
    where_.push_back({std::move(route), std::move(parent)});
  }
  watch_cv_.notify_all();
}

bool RankWatch::with_gil_for(std::chrono::milliseconds wait, std::function<void()> fn) {
  auto job = std::make_shared<GilJob>();
  job->fn = std::move(fn);
  {
    std::lock_guard lock(gil_mu_);
    gil_jobs_.push_back(job);
  }
  gil_cv_.notify_one();
  std::unique_lock lock(job->mu);
  if (!job->cv.wait_for(lock, wait, [&] { return job->started || job->done; })) {
    job->abandoned = true;  // fn refers to the caller's locals: it must never run now
    return false;
  }
  job->cv.wait(lock, [&] { return job->done; });
  return true;
}

void RankWatch::gil_loop() {
  for (;;) {
    std::shared_ptr<GilJob> job;
    {
      std::unique_lock lock(gil_mu_);
      gil_cv_.wait(lock, [&] { return stop_.load() || !gil_jobs_.empty(); });
      if (stop_) return;
      job = std::move(gil_jobs_.front());
      gil_jobs_.pop_front();
    }
    {
      py::gil_scoped_acquire gil;
      bool run = false;
      {
        std::lock_guard lock(job->mu);
        if (!job->abandoned) job->started = run = true;
      }
      job->cv.notify_all();
      if (run) {
        try {
          job->fn();
        } catch (const py::error_already_set& e) {
          PXF_LOG(warning, kLog) << "diagnosis: " << e.what();
        } catch (const std::exception& e) {
          PXF_LOG(warning, kLog) << "diagnosis: " << e.what();
        }
      }
    }
    {
      std::lock_guard lock(job->mu);
      job->done = true;
    }
    job->cv.notify_all();
  }
}

std::string RankWatch::native_stack() {
  if (stack_pipe_ < 0) return "";
  char buf[4096];
  while (::read(stack_pipe_, buf, sizeof buf) > 0) {}
  if (pthread_kill(main_thread_, stack_signal()) != 0) return "";
  std::string out;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{stack_pipe_, POLLIN, 0};
    int r = ::poll(&p, 1, out.empty() ? 100 : 30);
    if (r <= 0) {
      if (!out.empty()) break;  // quiet after some output: the dump is complete
      continue;
    }
    ssize_t n = ::read(stack_pipe_, buf, sizeof buf);
    if (n > 0) out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

void RankWatch::answer_where(WhereRequest& w) {
  Running r = running();
  json info{{"status", "ok"}, {"rank", rank_}, {"engine_id", engine_id_}, {"state", r.busy ? "busy" : "idle"}};
  if (r.busy) {
    try {
      info["msg_id"] = json::parse(r.parent).value("msg_id", "");
    } catch (const std::exception&) {
      info["msg_id"] = "";
    }
    info["msg_type"] = r.msg_type;
    info["running_for"] = seconds_since(r.since);
    // Only an interrupt that has not reached Python: the rank is stuck, not just busy.
    info["interrupted_for"] =
        r.was_interrupted && !r.interrupt_landed() ? json(seconds_since(r.interrupted)) : json(nullptr);
  }
  std::string content;
  bool answered = false;
  if (r.busy) {
    std::string in = info.dump();
    answered = with_gil_for(std::chrono::milliseconds(1000), [&] { content = host_.where_state(in); });
    if (!answered) {
      info["gil"] = "held";
      info["frames"] = frames_of_dump(native_stack());
      json& frames = info["frames"];
      info["where"] = frames.empty()
                          ? std::string("in native code, holding the GIL")
                          : "in native code, holding the GIL, called from " + frames.back()["file"].get<std::string>() +
                                " line " + std::to_string(frames.back()["line"].get<int>()) + " in " +
                                frames.back()["function"].get<std::string>();
    }
  }
  if (!answered) content = info.dump();
  json md{{"engine", uuid_}, {"status", "ok"}};
  host_.post(session_.encode_frames(std::move(w.route), frame(wire::dump_json(session_.make_header(link::kWhereReply))),
                                    frame(w.parent), frame(md.dump()), frame(content)));
}

void RankWatch::report_stuck(const Running& r) {
  json info{{"rank", rank_},
            {"engine_id", engine_id_},
            {"msg_type", r.msg_type},
            {"running_for", seconds_since(r.since)},
            {"interrupted_for", seconds_since(r.interrupted)},
            {"grace", interrupt_grace_}};
  std::string in = info.dump();
  bool done = with_gil_for(std::chrono::milliseconds(1000), [&] { host_.stuck_report(in, r.parent); });
  if (done) return;
  // The main thread holds the GIL inside native code: what faulthandler saw, said in C++.
  json frames = frames_of_dump(native_stack());
  std::ostringstream text;
  text << "[pxfabric] rank " << rank_ << " (engine " << engine_id_ << ") did not return to Python "
       << static_cast<int>(seconds_since(r.interrupted) + 0.5)
       << " s after the interrupt: it holds the GIL in native code";
  if (!frames.empty()) {
    const json& top = frames.back();
    text << ", called from " << top["file"].get<std::string>() << " line " << top["line"].get<int>() << " in "
         << top["function"].get<std::string>();
  }
  text << ".\n";
  if (!frames.empty()) {
    text << "Python stack (most recent call last):\n";
    std::size_t first = frames.size() > 6 ? frames.size() - 6 : 0;
    for (std::size_t i = first; i < frames.size(); ++i)
      text << "  " << frames[i]["file"].get<std::string>() << ", line " << frames[i]["line"].get<int>() << ", in "
           << frames[i]["function"].get<std::string>() << "\n";
  }
  text << "An interrupt cannot stop native code that never returns to Python. `pxcluster where` shows "
          "every rank; `pxcluster restart` recovers with the same engine ids.\n";
  json content{{"name", "stderr"}, {"text", text.str()}};
  json md{{"engine", uuid_}};
  Frames route;
  route.push_back(frame("iopub"));
  route.push_back(frame("engine." + std::to_string(engine_id_) + ".stderr"));
  host_.post(session_.encode_frames(std::move(route), frame(wire::dump_json(session_.make_header("stream"))),
                                    frame(r.parent), frame(md.dump()), frame(content.dump())));
}

void RankWatch::watch_loop() {
  std::uint64_t reported_seq = 0;
  std::chrono::steady_clock::time_point reported_at{};
  std::unique_lock lock(watch_mu_);
  for (;;) {
    if (stop_) return;
    if (!where_.empty()) {
      WhereRequest w = std::move(where_.front());
      where_.pop_front();
      lock.unlock();
      try {
        answer_where(w);
      } catch (const std::exception& e) {
        PXF_LOG(warning, kLog) << "where-request: " << e.what();
      }
      lock.lock();
      continue;
    }
    auto now = std::chrono::steady_clock::now();
    auto due = watches_.end();
    auto next = std::chrono::steady_clock::time_point::max();
    for (auto it = watches_.begin(); it != watches_.end(); ++it) {
      if (it->due <= now) {
        due = it;
        break;
      }
      next = std::min(next, it->due);
    }
    if (due != watches_.end()) {
      Watch wt = *due;
      watches_.erase(due);
      lock.unlock();
      Running r = running();
      // Still in the request the interrupt was for, and not yet reported since that interrupt.
      if (r.busy && r.seq == wt.seq && !r.interrupt_landed() &&
          !(reported_seq == r.seq && r.interrupted <= reported_at)) {
        reported_seq = r.seq;
        reported_at = std::chrono::steady_clock::now();
        try {
          report_stuck(r);
        } catch (const std::exception& e) {
          PXF_LOG(warning, kLog) << "stuck report: " << e.what();
        }
      }
      lock.lock();
      continue;
    }
    if (next == std::chrono::steady_clock::time_point::max()) watch_cv_.wait(lock);
    else watch_cv_.wait_until(lock, next);
  }
}

}  // namespace pxf::mpi
