#include "mpi/pyhost.hpp"

#include "gateway/gateway.hpp"
#include "link/protocol.hpp"
#include "util/log.hpp"

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <vector>

namespace pxf::mpi {

// A received frame as a Python object with a writable buffer: request buffers reach user code
// (numpy arrays unpacked from them) without a copy, and the frame lives as long as they do.
struct FrameBuffer {
  zmq::message_t msg;
};

}  // namespace pxf::mpi

PYBIND11_EMBEDDED_MODULE(_pxf_frames, m) {
  pybind11::class_<pxf::mpi::FrameBuffer>(m, "FrameBuffer", pybind11::buffer_protocol())
      .def_buffer([](pxf::mpi::FrameBuffer& f) {
        return pybind11::buffer_info(f.msg.data(), 1, pybind11::format_descriptor<std::uint8_t>::format(), 1,
                                     {static_cast<pybind11::ssize_t>(f.msg.size())}, {1}, /*readonly=*/false);
      });
}

namespace pxf::mpi {

using wire::frame;
using wire::json;
using wire::view;

namespace {
constexpr const char* kLog = "engine";

// IOPub messages published by this thread while it handles a shutdown_request: sent after the
// reply. The runtime publishes `shutdown_reply` on IOPub first, and a controller that
// unregisters the engine on that message (as the stock hub does) would otherwise drop the
// control reply that follows it on the link.
thread_local std::vector<Frames>* t_deferred = nullptr;
// On the main thread while a shell request runs (see publish).
thread_local bool t_in_shell = false;

std::string to_bytes(const py::handle& obj) {
  if (PyBytes_Check(obj.ptr())) return obj.cast<std::string>();
  if (PyUnicode_Check(obj.ptr())) return obj.cast<std::string>();
  return py::bytes(obj.attr("tobytes")()).cast<std::string>();
}

// Reply buffers of 64 KB or more leave without a copy: the frame holds a Py_buffer on the
// object (as pyzmq's zero-copy send holds the object on a stock engine) and, once MPI and
// ZeroMQ are done with it on whatever thread, queues it here; a thread holding the GIL
// releases it (release_sent_buffers). A 40 MB gather result was copied once more than on stock.
constexpr std::size_t kZeroCopyBytes = 64 * 1024;
std::mutex g_sent_mu;
std::vector<Py_buffer*> g_sent;  // guarded by g_sent_mu

void queue_release(void* /*data*/, void* hint) {
  std::lock_guard lock(g_sent_mu);
  g_sent.push_back(static_cast<Py_buffer*>(hint));
}

// GIL held.
void release_sent_buffers() {
  std::vector<Py_buffer*> done;
  {
    std::lock_guard lock(g_sent_mu);
    done.swap(g_sent);
  }
  for (Py_buffer* b : done) {
    PyBuffer_Release(b);
    delete b;
  }
}

// Python buffer objects as frames: those of `zero_copy_from` bytes or more hold a Py_buffer on
// the object until sent (queue_release); the others are copied (the caller may mutate them
// after we return). Non-contiguous buffers are copied through bytes.
Frames frames_of_buffers(const py::handle& buffers, std::size_t zero_copy_from) {
  Frames out;
  if (buffers.is_none()) return out;
  for (auto item : buffers) {
    auto b = std::make_unique<Py_buffer>();
    if (PyObject_GetBuffer(item.ptr(), b.get(), PyBUF_SIMPLE) != 0) {
      PyErr_Clear();
      std::string s = py::module_::import("builtins").attr("memoryview")(item).attr("tobytes")().cast<std::string>();
      out.emplace_back(s.data(), s.size());
      continue;
    }
    auto len = static_cast<std::size_t>(b->len);
    if (len >= zero_copy_from) {
      void* data = b->buf;
      out.emplace_back(data, len, &queue_release, b.release());
    } else {
      out.emplace_back(b->buf, len);
      PyBuffer_Release(b.get());
    }
  }
  return out;
}
}  // namespace

void import_engine_modules() {
  py::module_ sys = py::module_::import("sys");
  py::list path = sys.attr("path");
  std::vector<std::string> dirs;
  if (const char* env = std::getenv("PXF_PYTHONPATH"); env && *env) {
    std::string s(env);
    std::size_t start = 0;
    for (;;) {
      auto pos = s.find(':', start);
      dirs.push_back(s.substr(start, pos - start));
      if (pos == std::string::npos) break;
      start = pos + 1;
    }
  } else {
    // The package next to this program, found at run time (no path is compiled in, so a
    // copied or relocated prefix works, and ranks that mpirun starts on other hosts need no
    // PYTHONPATH): <prefix>/bin/pxengine -> <prefix>/lib/pxfabric/python. In a build tree
    // build/lib/pxfabric/python is a link to the checkout's python/ (mpi/CMakeLists.txt),
    // resolved here so that module paths (tracebacks, stuck-rank reports) name the checkout.
    std::error_code ec;
    auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    if (!ec) {
      auto dir = exe.parent_path().parent_path() / "lib" / "pxfabric" / "python";
      auto real = std::filesystem::canonical(dir, ec);
      dirs.push_back((ec ? dir : real).string());  // a missing one is named if the import fails
    }
  }
  int at = 0;
  for (const auto& d : dirs) {
    std::error_code ec;
    if (d.empty() || !std::filesystem::is_directory(d, ec)) continue;
    path.insert(at++, py::str(d));
  }
  sys.attr("argv") = py::make_tuple(py::str("pxengine"));
  sys.attr("argv") = py::list(sys.attr("argv"));
  // ipyparallel, IPython and jupyter_client load only the submodules an engine uses; their
  // __init__s run when user code first needs them (pxfabric/_lazy.py): ~0.2 s less CPU per rank.
  py::module_::import("_pxf_frames");  // registers FrameBuffer
  try {
    py::module_::import("pxfabric._lazy").attr("prepare_engine")();
  } catch (py::error_already_set& e) {
    // the package itself missing (an incomplete install, a moved bin/): say where we looked
    if (!e.matches(PyExc_ImportError) || py::str(e.value().attr("name")).cast<std::string>() != "pxfabric") throw;
    std::string looked;
    for (const auto& d : dirs) looked += (looked.empty() ? "" : ", ") + d;
    throw std::runtime_error(std::string(e.what()) + " (looked in " + (looked.empty() ? "no directory" : looked) +
                             " and sys.path: pxfabric belongs in lib/pxfabric/python next to pxengine's bin/, "
                             "or set PXF_PYTHONPATH)");
  }
  py::module_::import("pxfabric.engine");
}

PyHost::PyHost(HostConfig cfg, wire::SessionOptions session)
    : cfg_(std::move(cfg)),
      session_([&] {
        session.session_id = cfg_.uuid;
        return session;
      }()),
      watch_(cfg_.rank, cfg_.engine_id, cfg_.uuid, cfg_.interrupt_grace, session_, *this) {}

PyHost::~PyHost() {
  stop_control_ = true;
  control_cv_.notify_all();
  if (control_thread_.joinable()) control_thread_.join();
  watch_.stop();
}

void PyHost::create_runtime() {
  host_py_ = py::module_::import("pxfabric.host");
  host_py_.attr("setup_logging")(cfg_.log_fd, cfg_.log_level);
  py::cpp_function pub([this](py::object t, py::object c, py::object p, py::object m, py::object b, py::object tp) {
    publish(std::move(t), std::move(c), std::move(p), std::move(m), std::move(b), std::move(tp));
  });
  py::list shell_config;
  for (const auto& option : cfg_.shell_config) shell_config.append(py::str(option));
  rt_ = host_py_.attr("make_runtime")(cfg_.engine_id, cfg_.uuid, pub, cfg_.profile_dir, cfg_.capture_fds, shell_config);
  // SIGINT's handler while a request runs: signal.default_int_handler, plus a note that the
  // interrupt reached Python (a C function: no extra frame in the KeyboardInterrupt traceback).
  rt_.attr("request_sigint_handler") = py::cpp_function([this](py::args) {
    watch_.interrupt_landed();
    PyErr_SetNone(PyExc_KeyboardInterrupt);
    throw py::error_already_set();
  });
  int stack_pipe = -1;
  try {
    stack_pipe = host_py_.attr("setup_stack_dump")(RankWatch::stack_signal()).cast<int>();
  } catch (const py::error_already_set& e) {
    PXF_LOG(warning, kLog) << "no stack dumps without the GIL: " << e.what();
  }
  control_thread_ = std::thread([this] { control_loop(); });
  watch_.start(stack_pipe);  // on the main thread: the one whose stack it dumps
}

void PyHost::publish(py::object msg_type, py::object content, py::object parent, py::object metadata,
                     py::object buffers, py::object topic) {
  std::string c = host_py_.attr("pack")(content).cast<std::string>();
  std::string p = parent.is_none() ? std::string("{}") : pack_cached(parent, parent_cache_);
  std::string m = metadata.is_none() ? std::string("{}") : pack_cached(metadata, metadata_cache_);
  std::string type = py::str(msg_type).cast<std::string>();
  std::string tp =
      topic.is_none() ? std::string("engine." + std::to_string(cfg_.engine_id) + ".iopub") : to_bytes(topic);
  Frames bufs = frames_of_buffers(buffers, SIZE_MAX);  // publish copies (any thread may call it)
  Frames route;
  route.push_back(frame(link::kIopubChannel));
  route.push_back(frame(tp));
  auto frames = session_.encode_frames(std::move(route), frame(wire::dump_json(session_.make_header(type))), frame(p),
                                       frame(m), frame(c), std::move(bufs));
  if (t_deferred) {
    t_deferred->push_back(std::move(frames));
  } else {
    // Inside a shell request on the main thread, what always comes right before the reply
    // (status, the input echo, the result or error) waits for the reply's wake-up: one round
    // through the fabric per request instead of one per message. Outputs go at once.
    bool quiet =
        t_in_shell && (type == "status" || type == "execute_input" || type == "execute_result" || type == "error");
    fabric_->post(std::move(frames), !quiet);
  }
}

std::string PyHost::pack_cached(py::handle d, PackCache& cache) {
  PyObject* o = d.ptr();
  bool cacheable = PyDict_CheckExact(o);
  if (cacheable) {
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(o, &pos, &k, &v))
      if (!PyUnicode_CheckExact(k) || !PyUnicode_CheckExact(v)) {  // str == str is JSON-exact
        cacheable = false;
        break;
      }
  }
  if (cacheable && cache.key && PyObject_RichCompareBool(o, cache.key.ptr(), Py_EQ) == 1) return cache.json;
  std::string json = host_py_.attr("pack")(d).cast<std::string>();
  if (cacheable) {
    PyObject* copy = PyDict_Copy(o);  // immune to later changes of the caller's dict
    if (copy) {
      cache.key = py::reinterpret_steal<py::object>(copy);
      cache.json = json;
    } else {
      PyErr_Clear();
    }
  }
  return json;
}

void PyHost::send_reply(Frames route, const std::string& parent, const std::string& msg_type, py::bytes content,
                        py::bytes metadata, Frames buffers) {
  auto frames = session_.encode_frames(std::move(route), frame(wire::dump_json(session_.make_header(msg_type))),
                                       frame(parent), frame(metadata.cast<std::string>()),
                                       frame(content.cast<std::string>()), std::move(buffers));
  fabric_->post(std::move(frames));
}

void PyHost::push_work(Work&& w, bool front) {
  {
    std::lock_guard lock(mu_);
    if (front) work_.push_front(std::move(w));
    else work_.push_back(std::move(w));
  }
  cv_.notify_one();
}

void PyHost::push_control(Work&& w) {
  {
    std::lock_guard lock(mu_);
    control_.push_back(std::move(w));
  }
  control_cv_.notify_one();
}

void PyHost::deliver(Frames&& frames, double received) {
  if (frames.size() < 2) return;
  std::string ch(view(frames[0]));
  auto d = session_.decode(std::move(frames), {.parse_content = false, .check_replay = true});
  if (!d) {
    PXF_LOG(warning, kLog) << "dropped a " << ch << " message: " << d.detail;
    return;
  }
  auto& m = *d.msg;
  if (down_ || job_over_) {
    PXF_LOG(info, kLog) << "engine " << cfg_.engine_id << " is shut down; dropped " << m.msg_type() << " "
                        << m.msg_id();
    return;
  }
  Work w;
  w.received = received;
  w.metadata = std::string(view(m.metadata_frame));
  w.content = std::move(m.content_frame);
  w.buffers = std::move(m.buffers);
  if (ch == link::kBcastChannel) {
    bool targeted = false;
    auto targets = m.metadata.find("targets");
    if (targets != m.metadata.end() && targets->is_array()) {
      for (const auto& t : *targets) {
        const json& u = (t.is_array() && !t.empty()) ? t[0] : t;
        if (u.is_string() && u.get_ref<const std::string&>() == cfg_.uuid) targeted = true;
      }
    }
    if (!targeted) return;
    std::string orig = wire::get_or<std::string>(m.metadata, "original_msg_id", "");
    if (orig.empty()) orig = m.msg_id();
    json h = m.header;
    h["msg_id"] = orig + "_" + cfg_.uuid;
    w.parent = wire::dump_json(h);
    if (wire::get_or<bool>(m.metadata, "is_coalescing", false)) {
      w.route.push_back(frame(link::kPartChannel));
      w.route.push_back(frame(gateway::bcast_key(m.header, m.metadata)));
      w.route.push_back(frame(cfg_.uuid));
    } else {
      w.route.push_back(frame(link::kBcastChannel));
      w.route.push_back(frame(cfg_.uuid));
      for (std::size_t i = 1; i < m.identities.size(); ++i) w.route.push_back(std::move(m.identities[i]));
    }
    w.kind = Work::shell;
    w.msg_type = m.msg_type();
    push_work(std::move(w), false);
    return;
  }
  w.parent = std::string(view(m.header_frame));
  w.route = std::move(m.identities);
  w.msg_type = m.msg_type();
  if (ch == link::kControlChannel && w.msg_type == link::kWhereRequest) {
    watch_.where_requested(std::move(w.route), std::move(w.parent));
    return;
  }
  if (ch == link::kControlChannel && w.msg_type == "signal_request") watch_.signal_requested(w.content);
  if (ch == link::kControlChannel) {
    w.kind = Work::control;
    if (m.msg_type() == "clear_request") push_work(std::move(w), true);  // touches the namespace
    else push_control(std::move(w));
  } else {
    w.kind = Work::shell;
    push_work(std::move(w), false);
  }
}

void PyHost::job_ended(int code) {
  PXF_LOG(debug, kLog) << "job ended (code " << code << ")";
  job_over_ = true;
  {
    std::lock_guard lock(mu_);  // no lost wake-up between a predicate check and the wait
  }
  cv_.notify_all();
  control_cv_.notify_all();
}

void PyHost::rank_down(const char* why) {
  if (down_.exchange(true)) return;
  PXF_LOG(info, kLog) << "engine " << cfg_.engine_id << " (rank " << cfg_.rank << ") stops: " << why;
  Frames f;
  f.push_back(frame(link::kRankDownChannel));
  f.push_back(frame(std::to_string(cfg_.rank)));
  fabric_->post(std::move(f));
}

void PyHost::run_shell(Work& w) {
  struct InShell {
    Fabric* f;
    explicit InShell(Fabric* fab) : f(fab) { t_in_shell = true; }
    ~InShell() {
      t_in_shell = false;
      if (f) f->wake_if_quiet_posts();  // no reply (an exception): the held messages go now
    }
  } in_shell(fabric_);
  // Writable memoryviews straight onto the received frames (no copy; see FrameBuffer).
  py::list bufs;
  for (auto& b : w.buffers) {
    py::object owner = py::cast(FrameBuffer{std::move(b)});
    PyObject* mv = PyMemoryView_FromObject(owner.ptr());
    if (!mv) throw py::error_already_set();
    bufs.append(py::reinterpret_steal<py::object>(mv));
  }
  w.buffers.clear();
  py::tuple res = host_py_.attr("run_shell")(rt_, py::bytes(w.parent), py::bytes(w.metadata),
                                             py::bytes(static_cast<const char*>(w.content.data()), w.content.size()),
                                             bufs, w.received);
  py::object reply = res[0];
  if (!reply.is_none()) {
    py::tuple r = reply;
    send_reply(std::move(w.route), w.parent, r[0].cast<std::string>(), r[1], r[2],
               frames_of_buffers(r[3], kZeroCopyBytes));
  }
  if (res[1].cast<bool>()) rank_down("exit requested");
}

void PyHost::run_control(Work& w) {
  std::vector<Frames> deferred;
  if (w.msg_type == "shutdown_request") t_deferred = &deferred;
  py::tuple res;
  try {
    res = host_py_.attr("run_control")(rt_, py::bytes(w.parent),
                                       py::bytes(static_cast<const char*>(w.content.data()), w.content.size()));
  } catch (...) {
    t_deferred = nullptr;
    for (auto& f : deferred) fabric_->post(std::move(f));
    throw;
  }
  t_deferred = nullptr;
  py::object reply = res[0];
  if (!reply.is_none()) {
    py::tuple r = reply;
    send_reply(std::move(w.route), w.parent, r[0].cast<std::string>(), r[1], r[2], {});
  }
  for (auto& f : deferred) fabric_->post(std::move(f));
  if (res[1].cast<bool>()) {
    rank_down("shutdown_request");
    host_py_.attr("interrupt")(rt_);  // the stock engine process would exit mid-cell
    Work exit;
    exit.kind = Work::exit;
    push_work(std::move(exit), true);
  }
}

void PyHost::run() {
  for (;;) {
    Work w;
    {
      py::gil_scoped_release nogil;
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return job_over_.load() || !work_.empty(); });
      if (job_over_) break;
      w = std::move(work_.front());
      work_.pop_front();
    }
    if (w.kind == Work::exit) continue;
    if (down_) continue;
    release_sent_buffers();
    struct Busy {  // what the watch sees the main thread run
      RankWatch& watch;
      Busy(RankWatch& wt, const Work& w) : watch(wt) { watch.request_started(w.parent, w.msg_type); }
      ~Busy() { watch.request_finished(); }
    };
    try {
      if (w.kind == Work::shell) {
        Busy busy(watch_, w);
        run_shell(w);
      } else {
        run_control(w);
      }
    } catch (const py::error_already_set& e) {
      PXF_LOG(error, kLog) << "request failed inside the engine bridge: " << e.what();
    } catch (const std::exception& e) {
      PXF_LOG(error, kLog) << "request failed: " << e.what();
    }
  }
}

void PyHost::control_loop() {
  using clock = std::chrono::steady_clock;
  auto next_flush = clock::now() + std::chrono::milliseconds(200);
  bool interrupted = false;
  for (;;) {
    Work w;
    bool have = false;
    {
      std::unique_lock lock(mu_);
      control_cv_.wait_until(lock, next_flush, [&] {
        return stop_control_.load() || !control_.empty() || (job_over_.load() && !interrupted);
      });
      if (stop_control_) return;
      if (!control_.empty()) {
        w = std::move(control_.front());
        control_.pop_front();
        have = true;
      }
    }
    py::gil_scoped_acquire gil;
    try {
      if (have) run_control(w);
      if (job_over_ && !interrupted) {
        interrupted = true;
        host_py_.attr("interrupt")(rt_);
      }
      if (clock::now() >= next_flush) {
        release_sent_buffers();
        host_py_.attr("flush")(rt_);
        next_flush = clock::now() + std::chrono::milliseconds(200);
      }
    } catch (const py::error_already_set& e) {
      PXF_LOG(error, kLog) << "control thread: " << e.what();
    }
  }
}

// ---- RankWatch::Host ----------------------------------------------------------------------

std::string PyHost::where_state(const std::string& info) {
  return host_py_.attr("where_state")(rt_, py::bytes(info)).cast<std::string>();
}

void PyHost::stuck_report(const std::string& info, const std::string& parent) {
  host_py_.attr("stuck_report")(rt_, py::bytes(info), py::bytes(parent));
}

void PyHost::post(Frames&& frames) { fabric_->post(std::move(frames)); }

void PyHost::close() {
  stop_control_ = true;
  { std::lock_guard lock(mu_); }
  control_cv_.notify_all();
  {
    py::gil_scoped_release nogil;  // the watch's GIL thread may be waiting for it
    if (control_thread_.joinable()) control_thread_.join();
    watch_.stop();
  }
  try {
    if (rt_) rt_.attr("close")();
  } catch (const py::error_already_set& e) {
    PXF_LOG(warning, kLog) << "closing the runtime: " << e.what();
  }
  rt_ = py::object();
  host_py_ = py::object();
}

}  // namespace pxf::mpi
