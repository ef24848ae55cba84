#pragma once
// pxengine's command line: the stock ipengine options that ipyparallel's launchers pass.
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace pxf::mpi {

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct EngineOptions {
  std::optional<std::string> profile, profile_dir, cluster_id, ipython_dir, file;
  // Override the connection file's `location` and `ssh` (ipengine --location, --ssh, --sshkey).
  std::optional<std::string> location, sshserver;
  std::string sshkey;
  int log_level = 20;
  double timeout_s = 10.0;        // registration reply (IPEngine.timeout)
  double wait_for_file_s = 10.0;  // connection file (IPEngine.wait_for_url_file)
  int max_heartbeat_misses = 50;  // IPEngine.max_heartbeat_misses
  bool capture_fds = true;
  // Seconds before a rank an interrupt did not free reports where it is stuck (0: never).
  // Default $PXF_INTERRUPT_GRACE, else 3.
  double interrupt_grace = 3.0;
  bool help = false;
  bool version = false;  // --version: print it and exit (no MPI): `pxcluster check` runs it on each host
  // --Class.trait=value options for the IPython shell (stock engines pass their config to it,
  // e.g. ipyparallel's tests' --InteractiveShell.colors=nocolor), given to it as traitlets config.
  std::vector<std::string> shell_config;
  std::vector<std::string> warnings;  // ignored traitlets options, reported once MPI is up
};

// Throws UsageError naming the offending argument.
EngineOptions parse_options(int argc, char** argv);
extern const char* const kUsage;

}  // namespace pxf::mpi
