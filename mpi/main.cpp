// pxengine: `mpirun -n N pxengine [ipengine options]` makes every rank an ipyparallel engine.
// Rank 0 also runs the gateway (the job's one ZeroMQ connection, docs/fabric-link.md).
#include "conn/address.hpp"
#include "conn/connection_file.hpp"
#include "conn/profile.hpp"
#include "gateway/gateway.hpp"
#include "gateway/ssh_tunnel.hpp"
#include "mpi/fabric.hpp"
#include "mpi/options.hpp"
#include "mpi/pyhost.hpp"
#include "util/ids.hpp"
#include "util/log.hpp"
#include "util/memory.hpp"

#include <mpi.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

namespace {

using namespace pxf;
namespace py = pybind11;
namespace fs = std::filesystem;
constexpr const char* kLog = "pxengine";

bool likely_rank0() {
  for (const char* v : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"})
    if (const char* s = std::getenv(v)) return std::strcmp(s, "0") == 0;
  return true;
}

[[noreturn]] void finish(int code) {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (init && !fin) MPI_Finalize();
  std::fflush(nullptr);
  // The interpreter is deliberately not finalised: user threads could block Py_Finalize.
  _exit(code);
}

void bcast_string(std::string& s, MPI_Comm comm) {
  std::uint64_t n = s.size();
  MPI_Bcast(&n, 1, MPI_UINT64_T, 0, comm);
  s.resize(n);
  if (n) MPI_Bcast(s.data(), static_cast<int>(n), MPI_CHAR, 0, comm);
}

conn::ProfileLocation profile_of(const mpi::EngineOptions& o) {
  conn::ProfileRequest req;
  req.profile = o.profile;
  if (o.profile_dir) req.profile_dir = fs::path(*o.profile_dir);
  req.cluster_id = o.cluster_id;
  if (o.ipython_dir) req.ipython_dir = fs::path(*o.ipython_dir);
  return conn::resolve_profile(req);
}

// Rank 0: the engine connection file's text, found like the stock ipengine does.
std::string find_connection_info(const mpi::EngineOptions& o, const conn::ProfileLocation& loc, std::string& source) {
  if (const char* env = std::getenv("IPP_CONNECTION_INFO"); env && *env) {
    source = "$IPP_CONNECTION_INFO";
    conn::engine_from_text(env, source);  // validate
    return env;
  }
  fs::path path;
  if (o.file) {
    path = *o.file;
    std::error_code ec;
    if (!fs::exists(path, ec) && path.is_relative() && fs::exists(loc.security_dir() / path, ec))
      path = loc.security_dir() / path;
  } else {
    path = loc.engine_file();
  }
  source = path.string();
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(o.wait_for_file_s);
  bool said = false;
  std::error_code ec;
  while (!fs::exists(path, ec)) {
    if (std::chrono::steady_clock::now() >= deadline)
      throw conn::ConnectionFileError(path.string() + ": engine connection file not found (waited " +
                                      std::to_string(static_cast<int>(o.wait_for_file_s)) +
                                      " s; is pxcontroller running with this profile/cluster id?)");
    if (!said) {
      PXF_LOG(info, kLog) << "waiting for the connection file " << path.string();
      said = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(said ? 100 : 0));  // a file just renamed in
  std::ifstream in(path);
  if (!in) throw conn::ConnectionFileError(path.string() + ": cannot read");
  std::stringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  conn::engine_from_text(text, source);  // validate
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  memory::keep_freed_memory();  // before MPI, ZeroMQ or Python start threads
  mpi::EngineOptions opts;
  try {
    opts = mpi::parse_options(argc, argv);
  } catch (const mpi::UsageError& e) {
    if (likely_rank0()) std::fprintf(stderr, "pxengine: %s\n\n%s", e.what(), mpi::kUsage);
    return 2;
  }
  if (opts.version) {
    std::printf("pxengine %s\n", PXF_VERSION);
    return 0;
  }
  if (opts.help) {
    if (likely_rank0()) std::fputs(mpi::kUsage, stdout);
    return 0;
  }
  log::set_level(opts.log_level);
  log::set_name("pxengine");
  // C++ logs keep going to the real stderr when the runtime captures fds 1/2 for the clients.
  int log_fd = dup(2);
  if (FILE* f = log_fd >= 0 ? fdopen(log_fd, "w") : nullptr) {
    setvbuf(f, nullptr, _IOLBF, 0);
    stderr = f;
  } else {
    log_fd = 2;
  }

  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  log::set_name("pxengine:" + std::to_string(rank));
  if (provided < MPI_THREAD_MULTIPLE) {
    if (rank == 0)
      PXF_LOG(critical, kLog) << "the MPI library does not provide MPI_THREAD_MULTIPLE (provided level " << provided
                              << "); pxengine needs it";
    finish(1);
  }
  MPI_Comm p2p, coll;
  MPI_Comm_dup(MPI_COMM_WORLD, &p2p);
  MPI_Comm_dup(MPI_COMM_WORLD, &coll);
  if (rank == 0)
    for (auto& w : opts.warnings) PXF_LOG(warning, kLog) << w;

  // 1. Connection info: read on rank 0, broadcast.
  conn::ProfileLocation loc;
  std::string error, text, source;
  try {
    loc = profile_of(opts);
  } catch (const std::exception& e) {
    error = e.what();
  }
  if (rank == 0 && error.empty()) {
    try {
      text = find_connection_info(opts, loc, source);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  bcast_string(error, coll);
  if (!error.empty()) {
    if (rank == 0) PXF_LOG(critical, kLog) << error;
    finish(1);
  }
  bcast_string(text, coll);
  bcast_string(source, coll);
  conn::EngineInfo info = conn::engine_from_text(text, source);
  if (!info.pxf_fabric) {
    if (rank == 0)
      PXF_LOG(critical, kLog) << source << ": no \"pxf_fabric\" key: the controller is not a pxcontroller "
                              << "(pxengine needs pxcontroller; stock ipcontroller serves stock ipengine)";
    finish(1);
  }
  if (info.pack != "json" || info.unpack != "json") {
    if (rank == 0) PXF_LOG(critical, kLog) << source << ": only the json packer is supported";
    finish(1);
  }

  // 2. Python: import the heavy modules on every rank before registering.
  ::pybind11::initialize_interpreter(true);
  int ok = 1;
  try {
    mpi::import_engine_modules();
  } catch (const std::exception& e) {
    PXF_LOG(critical, kLog) << "cannot import the engine runtime (pxfabric.engine): " << e.what();
    ok = 0;
  }
  int all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, coll);
  if (!all_ok) finish(1);

  // 3. Identities: each rank's uuid and host, gathered on rank 0.
  std::string uuid = new_id();
  char name[256] = {};
  gethostname(name, sizeof name - 1);
  char mine[64 + 256] = {};
  std::snprintf(mine, 64, "%s", uuid.c_str());
  std::memcpy(mine + 64, name, 255);
  std::vector<char> all(rank == 0 ? sizeof mine * static_cast<std::size_t>(size) : 0);
  MPI_Gather(mine, sizeof mine, MPI_CHAR, all.data(), sizeof mine, MPI_CHAR, 0, coll);

  // 4. Registration (rank 0), ids broadcast.
  wire::SessionOptions sopts;
  sopts.key = info.key;
  sopts.signature_scheme = info.signature_scheme;
  std::unique_ptr<zmq::context_t> ctx;
  std::unique_ptr<gateway::Gateway> gw;
  std::unique_ptr<gateway::SshTunnel> tunnel;
  std::vector<int> ids(static_cast<std::size_t>(size), -1);
  int status = 0;
  if (rank == 0) {
    std::vector<gateway::RankInfo> ranks;
    for (int r = 0; r < size; ++r) {
      const char* rec = all.data() + static_cast<std::size_t>(r) * sizeof mine;
      ranks.push_back({std::string(rec, strnlen(rec, 64)), std::string(rec + 64, strnlen(rec + 64, 256))});
    }
    try {
      ctx = std::make_unique<zmq::context_t>(1);
      gateway::GatewayOptions go;
      // Where to dial, by ipengine's rules: a wildcard interface means the controller's
      // `location`; an `ssh` server means through a forward from this host.
      const std::string location = opts.location.value_or(info.location);
      const std::string ssh = opts.sshserver.value_or(info.ssh);
      go.url = conn::url(conn::disambiguate_interface(info.interface, location), *info.pxf_fabric);
      if (!ssh.empty()) {
        std::string host = go.url.substr(6, go.url.rfind(':') - 6);
        tunnel = std::make_unique<gateway::SshTunnel>(ssh, opts.sshkey, host, *info.pxf_fabric, opts.timeout_s);
        PXF_LOG(info, kLog) << "tunnelling " << go.url << " through " << ssh << " (127.0.0.1:" << tunnel->local_port()
                            << ")";
        go.url = tunnel->local_url();
      }
      go.job_uuid = new_id();
      go.session = sopts;
      go.register_timeout_ms = static_cast<int>(opts.timeout_s * 1000);
      go.max_heartbeat_misses = opts.max_heartbeat_misses;
      go.curve_serverkey = info.curve_serverkey.value_or("");
      gw = std::make_unique<gateway::Gateway>(*ctx, go);
      ids = gw->register_job(ranks);
    } catch (const std::exception& e) {
      PXF_LOG(critical, kLog) << "registration failed: " << e.what();
      status = 255;
    }
  }
  MPI_Bcast(&status, 1, MPI_INT, 0, coll);
  if (status) {
    gw.reset();
    if (ctx) ctx->close();
    tunnel.reset();
    finish(status);
  }
  MPI_Bcast(ids.data(), size, MPI_INT, 0, coll);

  // 5. Threads: fabric now (heartbeats must start), then the runtime on the main thread.
  mpi::HostConfig hc;
  hc.rank = rank;
  hc.engine_id = ids[static_cast<std::size_t>(rank)];
  hc.uuid = uuid;
  hc.profile_dir = loc.profile_dir.string();
  hc.log_fd = log_fd;
  hc.log_level = opts.log_level;
  hc.capture_fds = opts.capture_fds;
  hc.interrupt_grace = opts.interrupt_grace;
  hc.shell_config = opts.shell_config;
  mpi::PyHost host(hc, sopts);
  mpi::Fabric fabric(p2p, coll, rank, size, gw.get(), host);
  host.attach(&fabric);
  if (rank == 0) fabric.watch_termination();
  fabric.start();
  try {
    host.create_runtime();
  } catch (const std::exception& e) {
    PXF_LOG(critical, kLog) << "cannot start the engine runtime: " << e.what();
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  // Stock ipengine's words (ipyparallel's tests and users' scripts look for them).
  PXF_LOG(info, kLog) << "Completed registration with id " << hc.engine_id << " (rank " << rank << "/" << size
                      << ", uuid " << uuid << ")";

  host.run();  // until the job ends
  {
    ::pybind11::gil_scoped_release nogil;
    fabric.join();
  }
  host.close();
  int code = fabric.exit_code();
  gw.reset();
  if (ctx) ctx->close();  // delivers what the gateway sent last (linger 2 s)
  tunnel.reset();
  if (int sig = fabric.terminated_by()) {
    // Torn down from outside: no MPI_Finalize (other ranks may be gone); die of the signal.
    std::fflush(nullptr);
    ::signal(sig, SIG_DFL);
    ::raise(sig);
    _exit(128 + sig);
  }
  MPI_Comm_free(&p2p);
  MPI_Comm_free(&coll);
  PXF_LOG(debug, kLog) << "exiting with " << code;
  finish(code);
}
