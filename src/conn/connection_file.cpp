#include "conn/connection_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

namespace pxf::conn {

namespace {

// Real files are ~400 bytes; the cap keeps a wrong path (a log, /dev/zero...) from being slurped.
constexpr std::size_t kMaxFileBytes = 1 << 20;

[[noreturn]] void fail(const std::string& source, const std::string& problem) {
  throw ConnectionFileError(source + ": " + problem);
}

std::string errno_text(int err) { return std::strerror(err); }

// A JSON value as shown in a message, cut short so a huge value cannot flood a log line.
std::string shown(const json& v) {
  // `replace`: a message about a bad value must not itself throw on invalid UTF-8.
  std::string s = v.dump(-1, ' ', true, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

std::string describe(const json& v) {
  if (v.is_string()) return "the string " + shown(v);
  if (v.is_number_float()) return "the non-integer number " + shown(v);
  return std::string(v.type_name()) + " " + shown(v);
}

// Checks one parsed file against what the stock consumers require; `kind` is "client" or
// "engine" and only shapes the messages.
class Fields {
 public:
  Fields(const json& j, const std::string& source, const char* kind) : j_(j), source_(source), kind_(kind) {
    if (!j.is_object())
      fail(source,
           std::string("expected a JSON object {...} (an ipcontroller-") + kind + ".json file), got " + j.type_name());
  }

  bool has(const char* key) const { return j_.contains(key); }

  const json& need(const char* key) const {
    auto it = j_.find(key);
    if (it == j_.end())
      fail(source_, std::string("missing key '") + key +
                        "' (is this file from ipyparallel < 7.0 or another program? restart the "
                        "controller to rewrite it)");
    return *it;
  }

  [[noreturn]] void wrong(const std::string& key, const std::string& want, const json& got) const {
    fail(source_, "key '" + key + "' must be " + want + ", got " + describe(got));
  }

  int port_value(const std::string& key, const json& v) const {
    if (v.is_string())
      fail(source_, "key '" + key + "' must be an integer port, got " + describe(v) +
                        " (write ports as JSON numbers, e.g. \"" + key + "\": 5555)");
    if (!v.is_number_integer()) wrong(key, "an integer port", v);
    // Unsigned values above INT64_MAX must not wrap into range.
    const bool huge = v.is_number_unsigned() && v.get<std::uint64_t>() > 65535;
    const std::int64_t n = huge ? 65536 : v.get<std::int64_t>();
    if (n < 1 || n > 65535) fail(source_, "key '" + key + "' = " + shown(v) + " is not a TCP port (1-65535)");
    return static_cast<int>(n);
  }

  int port(const char* key) const { return port_value(key, need(key)); }

  std::string str(const char* key) const {
    const json& v = need(key);
    if (!v.is_string()) wrong(key, "a string", v);
    return v.get<std::string>();
  }

  // ssh, location, the engine's key: the stock consumers use .get() / setdefault, so a missing
  // key or null reads as "".
  std::string optional_str(const char* key) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return "";
    if (!it->is_string()) wrong(key, "a string", *it);
    return it->get<std::string>();
  }

  // Stock tests `if d.get('curve_serverkey')`: missing, null and "" all mean CURVE off.
  std::optional<std::string> curve_serverkey() const {
    std::string v = optional_str("curve_serverkey");
    if (v.empty()) return std::nullopt;
    return v;
  }

  void read_common(Common& c) const {
    c.ssh = optional_str("ssh");
    c.interface = str("interface");
    // Both consumers split the interface on "://" and fail without it.
    const auto sep = c.interface.find("://");
    if (sep == std::string::npos || sep == 0 || sep + 3 == c.interface.size())
      fail(source_, "key 'interface' = " + shown(need("interface")) +
                        " must look like \"tcp://127.0.0.1\" (<transport>://<ip>, no port)");
    c.location = optional_str("location");
    c.curve_serverkey = curve_serverkey();
    c.pack = str("pack");
    c.unpack = str("unpack");
    c.signature_scheme = str("signature_scheme");
    // jupyter_client's Session rejects any other scheme.
    if (c.signature_scheme.rfind("hmac-", 0) != 0)
      fail(source_, "key 'signature_scheme' = " + shown(need("signature_scheme")) +
                        " is not supported; use \"hmac-<hash>\", e.g. \"hmac-sha256\"");
  }

  // Reading one kind of file in place of the other is the likeliest mix-up; say so up front
  // instead of reporting a missing key.
  void reject_other_kind(const char* own_key, const char* other_key, const char* other_kind) const {
    if (!has(own_key) && has(other_key))
      fail(source_, std::string("this looks like an ipcontroller-") + other_kind + ".json file (it has '" + other_key +
                        "' but no '" + own_key + "'); pass the ipcontroller-" + kind_ + ".json file instead");
  }

 private:
  const json& j_;
  const std::string& source_;
  const char* kind_;
};

void put_common_head(ordered_json& j, const Common& c) {
  j["ssh"] = c.ssh;
  j["interface"] = c.interface;
}

void put_common_tail(ordered_json& j, const Common& c) {
  j["key"] = c.key;
  j["curve_serverkey"] = c.curve_serverkey ? ordered_json(*c.curve_serverkey) : ordered_json(nullptr);
  j["location"] = c.location;
  j["pack"] = c.pack;
  j["unpack"] = c.unpack;
  j["signature_scheme"] = c.signature_scheme;
}

json parse_text(const std::string& text, const std::string& source) {
  if (text.find_first_not_of(" \t\r\n") == std::string::npos)
    fail(source, "empty file (the controller may have died while starting; restart it)");
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    // nlohmann reports the position just past the input when the text stops mid-value.
    if (e.byte >= text.size())
      fail(source, "truncated JSON (the text ends before the object is complete; a partly "
                   "written or cut-off file? restart the controller to rewrite it)");
    std::string what = e.what();
    if (auto pos = what.find("] "); pos != std::string::npos) what = what.substr(pos + 2);
    fail(source, "not valid JSON (" + what + ")");
  }
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  // For closing by hand, where close()'s result matters (deferred write errors surface there).
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

std::string read_text(const fs::path& path) {
  const std::string src = path.string();
  // O_NONBLOCK: opening a FIFO by mistake must not hang; regular files ignore the flag.
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (fd.get() < 0) {
    const int err = errno;
    if (err == ENOENT)
      fail(src, "no such file (is the controller running? it writes this file at start-up; "
                "check --profile, --profile-dir and --cluster-id)");
    if (err == EACCES)
      fail(src, "cannot open: " + errno_text(err) +
                    " (connection files are mode 0600: run as the user who started the "
                    "controller)");
    fail(src, "cannot open: " + errno_text(err));
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) fail(src, "cannot stat: " + errno_text(errno));
  if (S_ISDIR(st.st_mode)) fail(src, "is a folder, not a connection file");
  if (!S_ISREG(st.st_mode)) fail(src, "not a regular file");
  if (static_cast<std::uint64_t>(st.st_size) > kMaxFileBytes)
    fail(src, "too large for a connection file (" + std::to_string(st.st_size) + " bytes); is this the right path?");
  std::string text;
  char buf[8192];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(src, "cannot read: " + errno_text(errno));
    }
    if (n == 0) break;
    text.append(buf, static_cast<std::size_t>(n));
    if (text.size() > kMaxFileBytes) fail(src, "too large for a connection file; is this the right path?");
  }
  return text;
}

std::string dump(const ordered_json& j, const std::string& target) {
  try {
    // Same bytes as Python's json.dumps(d, indent=2): ", " / ": " separators, non-ASCII
    // (and DEL) as \uXXXX, no trailing newline.
    return j.dump(2, ' ', /*ensure_ascii=*/true);
  } catch (const json::type_error& e) {
    fail(target, std::string("cannot serialize connection info: ") + e.what());
  }
}

// Creates every missing folder of `dir` with mode 0700 (connection files hold the HMAC key).
void make_private_dirs(const fs::path& dir, const std::string& target) {
  std::vector<fs::path> missing;
  for (fs::path p = dir; !p.empty(); p = p.parent_path()) {
    struct stat st {};
    if (::stat(p.c_str(), &st) == 0) {
      if (!S_ISDIR(st.st_mode)) fail(target, p.string() + " exists but is not a folder");
      break;
    }
    if (errno != ENOENT) fail(target, "cannot check folder " + p.string() + ": " + errno_text(errno));
    missing.push_back(p);
    if (p == p.parent_path()) break;
  }
  for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
    if (::mkdir(it->c_str(), 0700) != 0) {
      if (errno == EEXIST) continue;  // made concurrently by another process: fine
      fail(target, "cannot create folder " + it->string() + ": " + errno_text(errno));
    }
    // mkdir's mode is filtered by the umask; make it exactly 0700.
    if (::chmod(it->c_str(), 0700) != 0)
      fail(target, "cannot set mode 0700 on " + it->string() + ": " + errno_text(errno));
  }
}

}  // namespace

ordered_json to_json(const ClientInfo& c) {
  ordered_json j = ordered_json::object();
  put_common_head(j, c);
  j["registration"] = c.registration;
  j["control"] = c.control;
  j["mux"] = c.mux;
  j["task"] = c.task;
  j["task_scheme"] = c.task_scheme;
  j["iopub"] = c.iopub;
  j["notification"] = c.notification;
  j["broadcast"] = c.broadcast;
  put_common_tail(j, c);
  return j;
}

ordered_json to_json(const EngineInfo& e) {
  ordered_json j = ordered_json::object();
  put_common_head(j, e);
  j["registration"] = e.registration;
  j["control"] = e.control;
  j["mux"] = e.mux;
  j["task"] = e.task;
  j["iopub"] = e.iopub;
  j["hb_ping"] = e.hb_ping;
  j["hb_pong"] = e.hb_pong;
  j["broadcast"] = e.broadcast;
  put_common_tail(j, e);
  if (e.pxf_fabric) j["pxf_fabric"] = *e.pxf_fabric;
  return j;
}

ClientInfo client_from_json(const json& j, const std::string& source) {
  const Fields f(j, source, "client");
  f.reject_other_kind("notification", "hb_ping", "engine");
  ClientInfo c;
  f.read_common(c);
  // Stock Client() indexes cfg['key'] (KeyError -> "Connection file is invalid").
  c.key = f.str("key");
  c.registration = f.port("registration");
  c.control = f.port("control");
  c.mux = f.port("mux");
  c.task = f.port("task");
  c.task_scheme = f.str("task_scheme");
  c.iopub = f.port("iopub");
  c.notification = f.port("notification");
  const json& b = f.need("broadcast");
  if (b.is_array()) f.wrong("broadcast", "one integer port in the client file (a list is the engine file's format)", b);
  c.broadcast = f.port_value("broadcast", b);
  return c;
}

EngineInfo engine_from_json(const json& j, const std::string& source) {
  const Fields f(j, source, "engine");
  f.reject_other_kind("hb_ping", "notification", "client");
  EngineInfo e;
  f.read_common(e);
  // The stock engine uses d.get('key', ''): a missing key means unsigned messages.
  e.key = f.optional_str("key");
  e.registration = f.port("registration");
  e.control = f.port("control");
  e.mux = f.port("mux");
  e.task = f.port("task");
  e.iopub = f.port("iopub");
  e.hb_ping = f.port("hb_ping");
  e.hb_pong = f.port("hb_pong");
  const json& b = f.need("broadcast");
  if (!b.is_array()) f.wrong("broadcast", "a list of ports in the engine file (one per broadcast scheduler leaf)", b);
  // Engines pick broadcast[id % len]: an empty list would divide by zero.
  if (b.empty()) fail(source, "key 'broadcast' is an empty list; engines need at least one port");
  for (std::size_t i = 0; i < b.size(); ++i)
    e.broadcast.push_back(f.port_value("broadcast[" + std::to_string(i) + "]", b[i]));
  if (j.contains("pxf_fabric")) e.pxf_fabric = f.port("pxf_fabric");
  return e;
}

ClientInfo read_client_file(const fs::path& path) {
  const std::string src = path.string();
  return client_from_json(parse_text(read_text(path), src), src);
}

EngineInfo read_engine_file(const fs::path& path) {
  const std::string src = path.string();
  return engine_from_json(parse_text(read_text(path), src), src);
}

EngineInfo engine_from_text(const std::string& text, const std::string& source) {
  return engine_from_json(parse_text(text, source), source);
}

std::string to_file_text(const ordered_json& j) { return dump(j, "connection info"); }

void write_atomic(const fs::path& path, const ordered_json& j) {
  const std::string target = path.string();
  if (!path.has_filename()) fail(target, "not a file path");
  const std::string text = dump(j, target);
  const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
  make_private_dirs(dir, target);

  // Same folder as the target, so rename() is atomic (same filesystem). The leading dot keeps
  // it out of the way of anything listing *.json.
  std::string tmp = (dir / ("." + path.filename().string() + ".tmp-XXXXXX")).string();
  Fd fd(::mkostemp(tmp.data(), O_CLOEXEC));
  if (fd.get() < 0) fail(target, "cannot create a temporary file in " + dir.string() + ": " + errno_text(errno));
  // Removes the temporary file on every failure path below.
  struct Unlink {
    const std::string& name;
    bool armed = true;
    ~Unlink() {
      if (armed) ::unlink(name.c_str());
    }
  } cleanup{tmp};

  for (std::size_t off = 0; off < text.size();) {
    const ssize_t n = ::write(fd.get(), text.data() + off, text.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(target, "cannot write " + tmp + ": " + errno_text(errno));
    }
    off += static_cast<std::size_t>(n);
  }
  if (::fchmod(fd.get(), 0600) != 0) fail(target, "cannot chmod 0600 " + tmp + ": " + errno_text(errno));
  if (::fsync(fd.get()) != 0) fail(target, "cannot fsync " + tmp + ": " + errno_text(errno));
  if (::close(fd.release()) != 0) fail(target, "cannot close " + tmp + ": " + errno_text(errno));
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail(target, "cannot rename " + tmp + " onto it: " + errno_text(errno));
  cleanup.armed = false;

  // Persist the rename itself (the directory entry), not just the file's data.
  Fd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dfd.get() < 0 || ::fsync(dfd.get()) != 0)
    fail(target, "written, but cannot fsync folder " + dir.string() + ": " + errno_text(errno));
}

void write_client_file(const fs::path& path, const ClientInfo& c) {
  const ordered_json j = to_json(c);
  try {
    client_from_json(j, path.string());
  } catch (const ConnectionFileError& e) {
    throw ConnectionFileError(std::string("refusing to write ") + e.what());
  }
  write_atomic(path, j);
}

void write_engine_file(const fs::path& path, const EngineInfo& e) {
  const ordered_json j = to_json(e);
  try {
    engine_from_json(j, path.string());
  } catch (const ConnectionFileError& err) {
    throw ConnectionFileError(std::string("refusing to write ") + err.what());
  }
  write_atomic(path, j);
}

std::string url(const std::string& interface, int port) { return interface + ":" + std::to_string(port); }

}  // namespace pxf::conn
