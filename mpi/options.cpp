#include "mpi/options.hpp"

#include "util/log.hpp"

#include <charconv>
#include <functional>
#include <cstdlib>
#include <map>
#include <set>

namespace pxf::mpi {

const char* const kUsage = R"(Usage: mpirun -n N pxengine [options]

Every MPI rank becomes one ipyparallel engine (engine id = rank) of a pxcontroller.
Accepts the stock ipengine options that ipyparallel's launchers pass:

  --profile=NAME          IPython profile (default: default)
  --profile-dir=DIR       profile directory (beats --profile; $IPP_PROFILE_DIR)
  --cluster-id=ID         cluster id ($IPP_CLUSTER_ID)
  --ipython-dir=DIR       IPython directory
  --file=PATH             engine connection file (default:
                          <profile_dir>/security/ipcontroller[-<cluster_id>]-engine.json;
                          $IPP_CONNECTION_INFO, JSON text, beats both)
  --location=HOST         the controller's host, for a file whose interface is tcp://*
                          (default: the file's `location`; ipyparallel's rules)
  --ssh=[USER@]HOST[:PORT]  reach the controller through this SSH server (default: the
                          file's `ssh`); one `ssh -N -L` forward, BatchMode (no prompts);
                          $PXF_SSH is the ssh command (e.g. "ssh -F my_config")
  --sshkey=FILE           private key for --ssh
  --log-level=N           10 debug, 20 info (default), 30 warning, ...
  --mpi[=mpi4py]          accepted and ignored (pxengine always runs under MPI)
  --no-capture-fds        do not send C-level output on fds 1/2 to the clients
  --interrupt-grace=S     seconds an interrupt may take to return a rank to Python before the
                          rank reports on its stderr where it is stuck (default 3, or
                          $PXF_INTERRUPT_GRACE; 0 never reports)
  --IPEngine.timeout=S    seconds to wait for the registration reply (default 10)
  --IPEngine.wait_for_url_file=S   seconds to wait for the connection file (default 10)
  --IPEngine.max_heartbeat_misses=N  unanswered heartbeats before giving up (default 50)
  --version               print pxengine's version and exit (no MPI needed)
  --Class.trait=value     other traitlets options are ignored with a warning

Every rank imports the pxfabric Python package from lib/pxfabric/python next to this
program's bin/ (an install prefix or a build tree), or from $PXF_PYTHONPATH when set.
)";

namespace {
double to_double(const std::string& k, const std::string& v) {
  try {
    std::size_t pos = 0;
    double d = std::stod(v, &pos);
    if (pos == v.size()) return d;
  } catch (...) {}
  throw UsageError("invalid value for --" + k + ": '" + v + "'");
}
int to_int(const std::string& k, const std::string& v) {
  int out = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec != std::errc() || p != v.data() + v.size()) throw UsageError("invalid value for --" + k + ": '" + v + "'");
  return out;
}
// Configurable classes of the engine's IPython shell and what it owns.
bool is_shell_class(const std::string& cls) {
  static const std::set<std::string> shell = {
      "InteractiveShell", "ZMQInteractiveShell", "HistoryManager", "HistoryAccessor", "PlainTextFormatter",
      "DisplayFormatter", "BaseFormatter",       "IPCompleter",    "Completer",       "ScriptMagics",
      "StoreMagics",      "PrefilterManager",    "AliasManager",   "InlineBackend",   "LoggingMagics"};
  return shell.count(cls) > 0;
}
}  // namespace

EngineOptions parse_options(int argc, char** argv) {
  EngineOptions o;
  if (const char* env = std::getenv("PXF_INTERRUPT_GRACE"); env && *env) {
    try {
      o.interrupt_grace = to_double("interrupt-grace", env);
    } catch (const UsageError&) {
      throw UsageError(std::string("invalid PXF_INTERRUPT_GRACE: '") + env + "' (seconds >= 0)");
    }
    if (!(o.interrupt_grace >= 0))
      throw UsageError(std::string("invalid PXF_INTERRUPT_GRACE: '") + env + "' (seconds >= 0)");
  }
  using Setter = std::function<void(const std::string&, const std::string&)>;
  const std::map<std::string, Setter> valued = {
      {"profile", [&](auto&, auto& v) { o.profile = v; }},
      {"BaseIPythonApplication.profile", [&](auto&, auto& v) { o.profile = v; }},
      {"profile-dir", [&](auto&, auto& v) { o.profile_dir = v; }},
      {"ProfileDir.location", [&](auto&, auto& v) { o.profile_dir = v; }},
      {"cluster-id", [&](auto&, auto& v) { o.cluster_id = v; }},
      {"IPEngine.cluster_id", [&](auto&, auto& v) { o.cluster_id = v; }},
      {"ipython-dir", [&](auto&, auto& v) { o.ipython_dir = v; }},
      {"BaseIPythonApplication.ipython_dir", [&](auto&, auto& v) { o.ipython_dir = v; }},
      {"file", [&](auto&, auto& v) { o.file = v; }},
      {"url-file", [&](auto&, auto& v) { o.file = v; }},
      {"IPEngine.url_file", [&](auto&, auto& v) { o.file = v; }},
      {"log-level",
       [&](auto& k, auto& v) {
         if (!log::parse_level(v, o.log_level)) throw UsageError("invalid value for --" + k + ": '" + v + "'");
       }},
      {"Application.log_level",
       [&](auto& k, auto& v) {
         if (!log::parse_level(v, o.log_level)) throw UsageError("invalid value for --" + k + ": '" + v + "'");
       }},
      {"location", [&](auto&, auto& v) { o.location = v; }},
      {"IPEngine.location", [&](auto&, auto& v) { o.location = v; }},
      {"ssh", [&](auto&, auto& v) { o.sshserver = v; }},
      {"IPEngine.sshserver", [&](auto&, auto& v) { o.sshserver = v; }},
      {"sshkey", [&](auto&, auto& v) { o.sshkey = v; }},
      {"IPEngine.sshkey", [&](auto&, auto& v) { o.sshkey = v; }},
      {"IPEngine.timeout", [&](auto& k, auto& v) { o.timeout_s = to_double(k, v); }},
      {"interrupt-grace",
       [&](auto& k, auto& v) {
         o.interrupt_grace = to_double(k, v);
         if (!(o.interrupt_grace >= 0)) throw UsageError("invalid value for --" + k + ": '" + v + "' (seconds >= 0)");
       }},
      {"IPEngine.wait_for_url_file", [&](auto& k, auto& v) { o.wait_for_file_s = to_double(k, v); }},
      {"IPEngine.max_heartbeat_misses", [&](auto& k, auto& v) { o.max_heartbeat_misses = to_int(k, v); }},
  };
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help" || a == "--help-all") {
      o.help = true;
      continue;
    }
    if (a == "--version") {
      o.version = true;
      continue;
    }
    if (a.rfind("--", 0) != 0) throw UsageError("unexpected argument '" + a + "'");
    std::string key = a.substr(2), value;
    bool has_value = false;
    if (auto eq = key.find('='); eq != std::string::npos) {
      value = key.substr(eq + 1);
      key = key.substr(0, eq);
      has_value = true;
    }
    if (key == "mpi") continue;  // --mpi or --mpi=mpi4py: we are always an MPI job
    if (key == "no-capture-fds" && !has_value) {
      o.capture_fds = false;
      continue;
    }
    auto it = valued.find(key);
    if (it != valued.end()) {
      if (!has_value) {
        if (i + 1 >= argc) throw UsageError("option --" + key + " needs a value");
        value = argv[++i];
      }
      it->second(key, value);
      continue;
    }
    if (auto dot = key.find('.'); dot != std::string::npos && has_value && is_shell_class(key.substr(0, dot))) {
      o.shell_config.push_back("--" + key + "=" + value);
      continue;
    }
    if (key.find('.') != std::string::npos && has_value) {
      o.warnings.push_back("ignoring unsupported option --" + key + "=" + value);
      continue;
    }
    throw UsageError("unknown option '" + a + "'");
  }
  return o;
}

}  // namespace pxf::mpi
