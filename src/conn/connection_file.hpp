#pragma once
// ipcontroller[-<cluster_id>]-{client,engine}.json, read and written exactly as the stock
// ipcontroller does (every key, integer ports, the engine file's `broadcast` list).
#include <nlohmann/json.hpp>

#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace pxf::conn {

namespace fs = std::filesystem;
using json = nlohmann::json;
// Keeps insertion order: the files list their keys in the order stock ipcontroller writes them.
using ordered_json = nlohmann::ordered_json;

// Any problem with a connection file or profile location. what() names the file and says
// what is wrong, e.g. "/x/security/ipcontroller-client.json: missing key 'task_scheme'".
class ConnectionFileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Keys both files share.
struct Common {
  std::string interface = "tcp://127.0.0.1";
  std::string location;  // controller hostname
  std::string ssh;       // "" = no tunnel
  std::string key;       // HMAC key; "" = unsigned
  std::string signature_scheme = "hmac-sha256";
  std::string pack = "json";
  std::string unpack = "json";
  std::optional<std::string> curve_serverkey;  // null when CURVE is off

  friend bool operator==(const Common&, const Common&) = default;
};

struct ClientInfo : Common {
  int registration = 0, control = 0, mux = 0, task = 0, iopub = 0, notification = 0, broadcast = 0;
  std::string task_scheme = "leastload";

  friend bool operator==(const ClientInfo&, const ClientInfo&) = default;
};

struct EngineInfo : Common {
  int registration = 0, control = 0, mux = 0, task = 0, iopub = 0, hb_ping = 0, hb_pong = 0;
  std::vector<int> broadcast;  // one port per leaf broadcast scheduler; engine uses [id % size]
  // pxcontroller's fabric-link port for MPI engine jobs (docs/fabric-link.md); stock engines
  // ignore the extra key, and files from a stock ipcontroller do not have it.
  std::optional<int> pxf_fabric;

  friend bool operator==(const EngineInfo&, const EngineInfo&) = default;
};

// Keys in stock order (see ipcontroller-{client,engine}.json written by ipcontroller 7.1).
ordered_json to_json(const ClientInfo& c);
ordered_json to_json(const EngineInfo& e);
// `source` names where the JSON came from (a path, "IPP_CONNECTION_INFO") for error messages.
// Required keys are the ones the stock consumers require; `ssh`, `location` (and for the engine
// `key`) default to "", a null/empty/missing `curve_serverkey` means CURVE off. Unknown keys are
// ignored, as the stock consumers do.
ClientInfo client_from_json(const json& j, const std::string& source);
EngineInfo engine_from_json(const json& j, const std::string& source);

ClientInfo read_client_file(const fs::path& path);
EngineInfo read_engine_file(const fs::path& path);
// Parses the engine file's JSON text (as passed in $IPP_CONNECTION_INFO).
EngineInfo engine_from_text(const std::string& text, const std::string& source);

// The file text exactly as stock writes it: Python's json.dumps(j, indent=2) (ASCII-only, no
// trailing newline).
std::string to_file_text(const ordered_json& j);

// Writes to_file_text(j) to `path` atomically (temporary file in the same folder, fsync,
// chmod 0600, rename) creating missing parent folders (mode 0700). Readers never see a partial
// file: either the old content or the new.
void write_atomic(const fs::path& path, const ordered_json& j);
// Validate (as the readers would) then write_atomic: a file we would refuse to read is never
// written.
void write_client_file(const fs::path& path, const ClientInfo& c);
void write_engine_file(const fs::path& path, const EngineInfo& e);

// "tcp://127.0.0.1" + port -> "tcp://127.0.0.1:5555".
std::string url(const std::string& interface, int port);

}  // namespace pxf::conn
