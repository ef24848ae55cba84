#pragma once
// pxcontroller's command line, with ipcontroller's habits: `--opt=value` and `--opt value`,
// traitlets-style `--Class.trait=value`, and the IPP_* environment variables.
#include "conn/profile.hpp"

#include <optional>
#include <string>
#include <vector>

namespace pxf::controller {

struct Options {
  conn::ProfileRequest profile;
  std::string ip = "127.0.0.1";       // --ip: both sides unless client_ip/engine_ip say otherwise
  std::string engine_ip;              // "" = same as ip
  std::string client_ip;              // "" = same as ip
  std::string location;               // "" = this host's name
  std::string ssh_server;             // --ssh: written as `ssh` in the client file
  std::string engine_ssh_server;      // --enginessh: written as `ssh` in the engine file
  int registration_port = 0;          // --port; 0 = random
  std::vector<int> ports;             // --ports pool for the other sockets
  bool reuse = false;                 // --reuse: keep key and ports from existing files
  int ping_ms = 3000;                 // heartbeat period (--ping, HeartMonitor.period)
  int max_heartbeat_misses = 10;      // HeartMonitor.max_heartmonitor_misses
  double registration_timeout_s = 0;  // 0 = max(30, period/100) as stock
  int log_level = 20;
  std::string scheme = "leastload";               // TaskScheduler.scheme_name
  int hwm = 1;                                    // TaskScheduler.hwm, 0 = unlimited
  bool keep_records = true;                       // false: --nodb (stock's NoDB)
  std::size_t record_limit = 1024;                // DictDB.record_limit: task records kept
  std::size_t size_limit = std::size_t{1} << 30;  // DictDB.size_limit: buffer bytes kept
  double cull_fraction = 0.1;                     // DictDB.cull_fraction
  std::string key;                                // "" = random (IPP_SESSION_KEY / Session.key override)
  bool key_given = false;
  std::string signature_scheme = "hmac-sha256";
  // CurveZMQ on every socket the controller binds (--curve, IPController.enable_curve,
  // IPP_ENABLE_CURVE=1). Keys: Z85 text; generated when empty (IPP_CURVE_SECRETKEY/PUBLICKEY
  // or IPController.curve_secretkey/curve_publickey set them, as stock).
  bool curve = false;
  std::string curve_secretkey, curve_publickey;
  int broadcast_leaves = 2;           // engine-side broadcast ports (2**depth, depth 1 = stock)
  std::size_t max_message_bytes = 0;  // 0 = default limits
  std::vector<std::string> warnings;  // options accepted but ignored, reported at start-up
};

// Thrown for a usage error; what() names the offending option.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Parses argv (without argv[0]), the environment and the profile's ipcontroller_config.py
// (its `c.Class.trait = value` lines, as `--Class.trait=value` before the command line, so the
// command line wins). Throws UsageError. Returns std::nullopt when --help was asked for (help
// is printed to stdout).
std::optional<Options> parse_options(const std::vector<std::string>& args);

// The `c.Class.trait = literal` assignments of an ipcontroller_config.py, as
// "--Class.trait=value" arguments (strings unquoted, lists as "a,b"), in file order.
// Lines it cannot read (anything but assignments of literals, `c = get_config()`, imports,
// comments) are reported in `warnings` with file and line number, and skipped.
std::vector<std::string> read_config_file(const std::string& path, std::vector<std::string>& warnings);

std::string usage();

}  // namespace pxf::controller
