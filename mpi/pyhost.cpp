#include "mpi/pyhost.hpp"

#include "gateway/gateway.hpp"
#include "link/protocol.hpp"
#include "util/log.hpp"

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <sstream>
#include <vector>

#include <poll.h>
#include <pthread.h>
#include <unistd.h>

namespace pxf::mpi {

// A received frame as a Python object with a writable buffer: request buffers reach user code
// (numpy arrays unpacked from them) without a copy, and the frame lives as long as they do.
struct FrameBuffer {
  zmq::message_t msg;
};

} // namespace pxf::mpi

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

// Python half of the bridge: JSON in and out exactly as jupyter_client packs it, and the calls
// into the runtime, so the C++ side only moves bytes.
constexpr const char* kGlue = R"PY(
import json, logging, os, sys

def _json_default(obj):
    from jupyter_client.jsonutil import json_default
    return json_default(obj)

def pack(obj):
    try:
        s = json.dumps(obj, default=_json_default, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        from ipykernel.jsonutil import json_clean
        s = json.dumps(json_clean(obj), default=_json_default, ensure_ascii=False)
    return s.encode("utf8", "surrogateescape")

def _loads(b):
    if not b:
        return {}
    v = json.loads(b)
    return v if isinstance(v, dict) else {}

def run_shell(rt, header_b, md_b, content_b, bufs, received):
    header = json.loads(header_b)
    md = _loads(md_b)
    content = _loads(content_b)
    r = rt.handle_shell(header.get("msg_type"), header, md, content, bufs, received)
    down = bool(rt.shutdown_requested or rt.exit_requested)
    if r is None:
        return None, down
    t, c, m, b = r
    return (t, pack(c), pack(m), list(b)), down

def run_control(rt, header_b, content_b):
    header = json.loads(header_b)
    content = _loads(content_b)
    r = rt.handle_control(header.get("msg_type"), header, content)
    down = bool(rt.shutdown_requested)
    if r is None:
        return None, down
    t, c, m = r
    return (t, pack(c), pack(m)), down

def flush(rt):
    if rt.output_pending:
        rt.flush_output()

def interrupt(rt):
    return rt.interrupt()

def setup_logging(fd, level):
    stream = os.fdopen(os.dup(fd), "w", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s [pxengine %(process)d] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)

def setup_stack_dump(sig):
    # The fallback for a main thread that holds the GIL in native code: faulthandler's handler
    # writes the stack of the thread it runs on (the main thread: pthread_kill) without the GIL.
    # Both ends non-blocking: a dump nobody reads must never block the main thread.
    import faulthandler
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    faulthandler.register(sig, file=w, all_threads=False, chain=False)
    return r

def where_state(rt, info_b):
    from pxfabric.stuck import where_state
    return pack(where_state(rt, json.loads(info_b)))

def stuck_report(rt, info_b, parent_b):
    from pxfabric.stuck import publish_report
    publish_report(rt, json.loads(info_b), json.loads(parent_b))

def make_runtime(engine_id, uuid, publish, profile_dir, capture_fds):
    from pxfabric.engine import EngineRuntime
    return EngineRuntime(engine_id, uuid, publish, profile_dir=profile_dir or None,
                         capture_fds=capture_fds)
)PY";

py::object load_glue() {
  py::module_ types = py::module_::import("types");
  py::object mod = types.attr("ModuleType")("_pxf_glue");
  py::exec(kGlue, mod.attr("__dict__"));
  return mod;
}

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
} // namespace

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
    if (!e.matches(PyExc_ImportError) || py::str(e.value().attr("name")).cast<std::string>() != "pxfabric")
      throw;
    std::string looked;
    for (const auto& d : dirs) looked += (looked.empty() ? "" : ", ") + d;
    throw std::runtime_error(std::string(e.what()) + " (looked in " + (looked.empty() ? "no directory" : looked) +
                             " and sys.path: pxfabric belongs in lib/pxfabric/python next to pxengine's bin/, "
                             "or set PXF_PYTHONPATH)");
  }
  py::module_::import("pxfabric.engine");
}

PyHost::PyHost(HostConfig cfg, wire::SessionOptions session)
    : cfg_(std::move(cfg)), session_([&] {
        session.session_id = cfg_.uuid;
        return session;
      }()) {}

PyHost::~PyHost() {
  stop_control_ = true;
  stop_watch_ = true;
  control_cv_.notify_all();
  watch_cv_.notify_all();
  gil_cv_.notify_all();
  if (control_thread_.joinable()) control_thread_.join();
  if (watch_thread_.joinable()) watch_thread_.join();
  if (gil_thread_.joinable()) gil_thread_.join();
}

void PyHost::create_runtime() {
  glue_ = load_glue();
  glue_.attr("setup_logging")(cfg_.log_fd, cfg_.log_level);
  py::cpp_function pub([this](py::object t, py::object c, py::object p, py::object m, py::object b, py::object tp) {
    publish(std::move(t), std::move(c), std::move(p), std::move(m), std::move(b), std::move(tp));
  });
  rt_ = glue_.attr("make_runtime")(cfg_.engine_id, cfg_.uuid, pub, cfg_.profile_dir, cfg_.capture_fds);
  // SIGINT's handler while a request runs: signal.default_int_handler, plus a note that the
  // interrupt reached Python (a C function: no extra frame in the KeyboardInterrupt traceback).
  rt_.attr("request_sigint_handler") = py::cpp_function([this](py::args) {
    {
      std::lock_guard lock(run_mu_);
      run_.landed = std::chrono::steady_clock::now();
    }
    PyErr_SetNone(PyExc_KeyboardInterrupt);
    throw py::error_already_set();
  });
  main_thread_ = pthread_self();
  stack_signal_ = SIGRTMIN + 7;
  try {
    stack_pipe_ = glue_.attr("setup_stack_dump")(stack_signal_).cast<int>();
  } catch (const py::error_already_set& e) {
    PXF_LOG(warning, kLog) << "no stack dumps without the GIL: " << e.what();
  }
  control_thread_ = std::thread([this] { control_loop(); });
  gil_thread_ = std::thread([this] { gil_loop(); });
  watch_thread_ = std::thread([this] { watch_loop(); });
}

void PyHost::publish(py::object msg_type, py::object content, py::object parent, py::object metadata,
                     py::object buffers, py::object topic) {
  std::string c = glue_.attr("pack")(content).cast<std::string>();
  std::string p = parent.is_none() ? std::string("{}") : pack_cached(parent, parent_cache_);
  std::string m = metadata.is_none() ? std::string("{}") : pack_cached(metadata, metadata_cache_);
  std::string type = py::str(msg_type).cast<std::string>();
  std::string tp = topic.is_none() ? std::string("engine." + std::to_string(cfg_.engine_id) + ".iopub")
                                   : to_bytes(topic);
  Frames bufs = frames_of_buffers(buffers, SIZE_MAX);  // publish copies (any thread may call it)
  Frames route;
  route.push_back(frame(link::kIopubChannel));
  route.push_back(frame(tp));
  auto frames = session_.encode_frames(std::move(route), frame(wire::dump_json(session_.make_header(type))),
                                       frame(p), frame(m), frame(c), std::move(bufs));
  if (t_deferred) {
    t_deferred->push_back(std::move(frames));
  } else {
    // Inside a shell request on the main thread, what always comes right before the reply
    // (status, the input echo, the result or error) waits for the reply's wake-up: one round
    // through the fabric per request instead of one per message. Outputs go at once.
    bool quiet = t_in_shell && (type == "status" || type == "execute_input" || type == "execute_result" ||
                                type == "error");
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
  std::string json = glue_.attr("pack")(d).cast<std::string>();
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
    {
      std::lock_guard lock(watch_mu_);
      where_.push_back(std::move(w));
    }
    watch_cv_.notify_all();
    return;
  }
  if (ch == link::kControlChannel && w.msg_type == "signal_request") note_signal_request(w.content);
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
  py::tuple res = glue_.attr("run_shell")(rt_, py::bytes(w.parent), py::bytes(w.metadata),
                                          py::bytes(static_cast<const char*>(w.content.data()), w.content.size()),
                                          bufs, w.received);
  py::object reply = res[0];
  if (!reply.is_none()) {
    py::tuple r = reply;
    send_reply(std::move(w.route), w.parent, r[0].cast<std::string>(), r[1], r[2], frames_of_buffers(r[3], kZeroCopyBytes));
  }
  if (res[1].cast<bool>()) rank_down("exit requested");
}

void PyHost::run_control(Work& w) {
  std::vector<Frames> deferred;
  if (w.msg_type == "shutdown_request") t_deferred = &deferred;
  py::tuple res;
  try {
    res = glue_.attr("run_control")(rt_, py::bytes(w.parent),
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
    glue_.attr("interrupt")(rt_);  // the stock engine process would exit mid-cell
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
    struct Busy {
      PyHost* h;
      Busy(PyHost* host, const Work& w) : h(host) {
        std::lock_guard lock(h->run_mu_);
        ++h->run_.seq;
        h->run_.busy = true;
        h->run_.parent = w.parent;
        h->run_.msg_type = w.msg_type;
        h->run_.since = std::chrono::steady_clock::now();
        h->run_.was_interrupted = false;
      }
      ~Busy() {
        std::lock_guard lock(h->run_mu_);
        h->run_.busy = false;
      }
    };
    try {
      if (w.kind == Work::shell) {
        Busy busy(this, w);
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
        glue_.attr("interrupt")(rt_);
      }
      if (clock::now() >= next_flush) {
        release_sent_buffers();
        glue_.attr("flush")(rt_);
        next_flush = clock::now() + std::chrono::milliseconds(200);
      }
    } catch (const py::error_already_set& e) {
      PXF_LOG(error, kLog) << "control thread: " << e.what();
    }
  }
}

// ---- diagnosis of stuck ranks ------------------------------------------------------------

struct PyHost::GilJob {
  std::function<void()> fn;
  std::mutex mu;
  std::condition_variable cv;
  bool started = false, done = false, abandoned = false;  // under mu
};

PyHost::Running PyHost::running() {
  std::lock_guard lock(run_mu_);
  return run_;
}

void PyHost::note_signal_request(const zmq::message_t& content) {
  // Only SIGINT frees a rank that is running a request (other signals end the process).
  bool sigint = false;
  try {
    auto c = json::parse(view(content));
    auto it = c.find("sig");
    if (it != c.end()) {
      if (it->is_number_integer()) sigint = it->get<int>() == SIGINT;
      else if (it->is_string()) sigint = it->get_ref<const std::string&>() == "SIGINT" ||
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
  if (cfg_.interrupt_grace <= 0) return;
  {
    std::lock_guard lock(watch_mu_);
    watches_.push_back({seq, now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                       std::chrono::duration<double>(cfg_.interrupt_grace))});
  }
  watch_cv_.notify_all();
}

bool PyHost::with_gil_for(std::chrono::milliseconds wait, std::function<void()> fn) {
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

void PyHost::gil_loop() {
  for (;;) {
    std::shared_ptr<GilJob> job;
    {
      std::unique_lock lock(gil_mu_);
      gil_cv_.wait(lock, [&] { return stop_watch_.load() || !gil_jobs_.empty(); });
      if (stop_watch_) return;
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

std::string PyHost::native_stack() {
  if (stack_pipe_ < 0) return "";
  char buf[4096];
  while (::read(stack_pipe_, buf, sizeof buf) > 0) {
  }
  if (pthread_kill(main_thread_, stack_signal_) != 0) return "";
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

namespace {
double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// The engine's own frames (the bridge, the runtime, IPython running a cell), which a user does
// not want to read: what python/pxfabric/stuck.py leaves out too.
bool internal_file(const std::string& file) {
  static const char* const kInternal[] = {"/pxfabric/", "/IPython/", "/ipykernel/", "/ipyparallel/",
                                          "/traitlets/"};
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
} // namespace

void PyHost::answer_where(Work& w) {
  Running r = running();
  json info{{"status", "ok"}, {"rank", cfg_.rank}, {"engine_id", cfg_.engine_id},
            {"state", r.busy ? "busy" : "idle"}};
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
    answered = with_gil_for(std::chrono::milliseconds(1000), [&] {
      content = glue_.attr("where_state")(rt_, py::bytes(in)).cast<std::string>();
    });
    if (!answered) {
      info["gil"] = "held";
      info["frames"] = frames_of_dump(native_stack());
      json& frames = info["frames"];
      info["where"] = frames.empty() ? std::string("in native code, holding the GIL")
                                     : "in native code, holding the GIL, called from " +
                                           frames.back()["file"].get<std::string>() + " line " +
                                           std::to_string(frames.back()["line"].get<int>()) + " in " +
                                           frames.back()["function"].get<std::string>();
    }
  }
  if (!answered) content = info.dump();
  json md{{"engine", cfg_.uuid}, {"status", "ok"}};
  fabric_->post(session_.encode_frames(std::move(w.route),
                                       frame(wire::dump_json(session_.make_header(link::kWhereReply))),
                                       frame(w.parent), frame(md.dump()), frame(content)));
}

void PyHost::report_stuck(const Running& r) {
  json info{{"rank", cfg_.rank}, {"engine_id", cfg_.engine_id}, {"msg_type", r.msg_type},
            {"running_for", seconds_since(r.since)}, {"interrupted_for", seconds_since(r.interrupted)},
            {"grace", cfg_.interrupt_grace}};
  std::string in = info.dump();
  bool done = with_gil_for(std::chrono::milliseconds(1000), [&] {
    glue_.attr("stuck_report")(rt_, py::bytes(in), py::bytes(r.parent));
  });
  if (done) return;
  // The main thread holds the GIL inside native code: what faulthandler saw, said in C++.
  json frames = frames_of_dump(native_stack());
  std::ostringstream text;
  text << "[pxfabric] rank " << cfg_.rank << " (engine " << cfg_.engine_id << ") did not return to Python "
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
  json md{{"engine", cfg_.uuid}};
  Frames route;
  route.push_back(frame(link::kIopubChannel));
  route.push_back(frame("engine." + std::to_string(cfg_.engine_id) + ".stderr"));
  fabric_->post(session_.encode_frames(std::move(route), frame(wire::dump_json(session_.make_header("stream"))),
                                       frame(r.parent), frame(md.dump()), frame(content.dump())));
}

void PyHost::watch_loop() {
  std::uint64_t reported_seq = 0;
  std::chrono::steady_clock::time_point reported_at{};
  std::unique_lock lock(watch_mu_);
  for (;;) {
    if (stop_watch_) return;
    if (!where_.empty()) {
      Work w = std::move(where_.front());
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

void PyHost::close() {
  stop_control_ = true;
  {
    std::lock_guard lock(mu_);
  }
  control_cv_.notify_all();
  stop_watch_ = true;
  {
    std::lock_guard l1(watch_mu_);
    std::lock_guard l2(gil_mu_);
  }
  watch_cv_.notify_all();
  gil_cv_.notify_all();
  {
    py::gil_scoped_release nogil;
    if (control_thread_.joinable()) control_thread_.join();
    if (watch_thread_.joinable()) watch_thread_.join();
    if (gil_thread_.joinable()) gil_thread_.join();
  }
  try {
    if (rt_) rt_.attr("close")();
  } catch (const py::error_already_set& e) {
    PXF_LOG(warning, kLog) << "closing the runtime: " << e.what();
  }
  rt_ = py::object();
  glue_ = py::object();
}

} // namespace pxf::mpi
