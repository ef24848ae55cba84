// pxtunnel: every port of a remote controller's client connection file, forwarded to local
// loopback ports through ONE SSH session (libssh), plus a local connection file for them, so that
// the stock client connects with `ipp.Client(profile='<host>')` and no `sshserver=`.
//
//   pxtunnel [user@]host [-p PORT] [-F ssh_config] [-i identity]... [-J jumphost]
//            [--remote-profile-dir DIR | --remote-file PATH] [--cluster-id ID]
//            [--local-profile-dir DIR] [--accept-new-host-key] [--known-hosts FILE]
//
// One process, one thread, one libssh session (libssh sessions are not thread-safe): a poll()
// loop over the session's socket, the local listeners and the accepted local connections. Each
// accepted local connection gets its own `direct-tcpip` channel to the controller's port as seen
// from the SSH host. Local ports: the remote port number when it is free on 127.0.0.1, otherwise
// a free port the kernel picks (the local connection file says which). The local file has the
// remote file's key, signature_scheme and curve_serverkey, `interface` tcp://127.0.0.1, `ssh` ""
// and `location` = this machine's hostname.
//
// The session is kept alive (TCP keepalive + SSH_MSG_IGNORE), and re-established with a bounded
// backoff when it drops; the local listeners stay, so ZeroMQ clients simply reconnect. SIGTERM,
// SIGINT or SIGHUP: everything is closed, the local connection file removed, exit 0. When the
// remote connection file disappears (the controller stopped) pxtunnel exits with status 3.
#include "conn/address.hpp"
#include "conn/connection_file.hpp"
#include "conn/profile.hpp"
#include "util/log.hpp"

#include <libssh/callbacks.h>
#include <libssh/libssh.h>
#include <libssh/sftp.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace {

namespace conn = pxf::conn;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr const char* kComponent = "tunnel";
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitControllerGone = 3;
constexpr size_t kChunk = 256 * 1024;

volatile sig_atomic_t g_stop = 0;
void on_signal(int sig) { g_stop = sig; }

// A failure that ends pxtunnel (exit status 1) with a message for the user.
struct Fatal : std::runtime_error {
  explicit Fatal(const std::string& what, int code = kExitError) : std::runtime_error(what), code(code) {}
  int code;
};

struct Options {
  std::string target;  // as typed: [user@]host
  std::string user, host;
  int port = 0;
  std::string config_file;
  std::vector<std::string> identities;
  std::string jump;
  std::string remote_profile_dir, remote_file, cluster_id;
  bool cluster_id_set = false;
  std::string local_profile_dir;
  bool accept_new = false;
  std::string known_hosts;
  long connect_timeout = 10;
  int log_level = pxf::log::info;
};

const char* kUsage = "usage: pxtunnel [user@]host [-p PORT] [-F ssh_config] [-i identity]... [-J jumphost]\n"
                     "                [--remote-profile-dir DIR | --remote-file PATH] [--cluster-id ID]\n"
                     "                [--local-profile-dir DIR] [--accept-new-host-key] [--known-hosts FILE]\n"
                     "                [--connect-timeout S] [--log-level N]\n"
                     "\n"
                     "Forward every port of the controller connection file on HOST (default\n"
                     "~/.ipython/profile_default/security/ipcontroller[-ID]-client.json there) through one SSH\n"
                     "session to 127.0.0.1, and write a local connection file for them (default\n"
                     "$IPYTHONDIR/profile_HOST/security/ipcontroller[-ID]-client.json), so that\n"
                     "ipp.Client(profile='HOST') works. Reads ~/.ssh/config (or -F), uses ssh-agent and keys,\n"
                     "never prompts. Unknown or changed host keys are refused; --accept-new-host-key records an\n"
                     "unknown one (a changed key is always refused). Stop it with SIGTERM or Ctrl-C: it removes\n"
                     "the local connection file.\n";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "pxtunnel: %s\n%s", msg.c_str(), kUsage);
  std::exit(kExitUsage);
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (size_t i = 0; i < args.size(); ++i) {
    std::string a = args[i];
    std::optional<std::string> inline_value;
    if (a.rfind("--", 0) == 0) {
      auto eq = a.find('=');
      if (eq != std::string::npos) {
        inline_value = a.substr(eq + 1);
        a = a.substr(0, eq);
      }
    }
    auto value = [&]() -> std::string {
      if (inline_value) return *inline_value;
      if (i + 1 >= args.size()) usage_error(a + " needs a value");
      return args[++i];
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (a == "--version") {
      std::printf("pxtunnel %s (%s)\n", PXF_VERSION, ssh_version(0));
      std::exit(0);
    } else if (a == "-p" || a == "--port") {
      std::string v = value();
      char* end = nullptr;
      long p = std::strtol(v.c_str(), &end, 10);
      if (!end || *end || p <= 0 || p > 65535) usage_error("bad port '" + v + "'");
      o.port = static_cast<int>(p);
    } else if (a == "-F" || a == "--ssh-config") {
      o.config_file = value();
    } else if (a == "-i" || a == "--identity") {
      o.identities.push_back(value());
    } else if (a == "-J" || a == "--jump") {
      o.jump = value();
    } else if (a == "--remote-profile-dir") {
      o.remote_profile_dir = value();
    } else if (a == "--remote-file") {
      o.remote_file = value();
    } else if (a == "--cluster-id") {
      o.cluster_id = value();
      o.cluster_id_set = true;
    } else if (a == "--local-profile-dir") {
      o.local_profile_dir = value();
    } else if (a == "--accept-new-host-key") {
      if (inline_value) usage_error("--accept-new-host-key takes no value");
      o.accept_new = true;
    } else if (a == "--known-hosts") {
      o.known_hosts = value();
    } else if (a == "--connect-timeout") {
      std::string v = value();
      char* end = nullptr;
      long t = std::strtol(v.c_str(), &end, 10);
      if (!end || *end || t <= 0) usage_error("bad --connect-timeout '" + v + "'");
      o.connect_timeout = t;
    } else if (a == "--log-level") {
      std::string v = value();
      if (!pxf::log::parse_level(v, o.log_level)) usage_error("bad --log-level '" + v + "'");
    } else if (!a.empty() && a[0] == '-') {
      usage_error("unknown option " + a);
    } else if (o.target.empty()) {
      o.target = a;
    } else {
      usage_error("unexpected argument '" + a + "'");
    }
  }
  if (o.target.empty()) usage_error("no host given");
  if (!o.remote_profile_dir.empty() && !o.remote_file.empty())
    usage_error("--remote-profile-dir and --remote-file exclude each other");
  auto at = o.target.rfind('@');
  if (at != std::string::npos) {
    o.user = o.target.substr(0, at);
    o.host = o.target.substr(at + 1);
  } else {
    o.host = o.target;
  }
  if (o.host.empty() || o.host.find_first_of("/ \t") != std::string::npos) usage_error("bad host '" + o.target + "'");
  return o;
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') out += "'\\''";
    else out += c;
  }
  return out + "'";
}

// The path as the SSH server sees it: "~/x" and relative paths are relative to the login's home
// (SFTP and exec both start there).
std::string server_path(const std::string& p) {
  if (p == "~") return ".";
  if (p.rfind("~/", 0) == 0) return p.substr(2);
  return p;
}

std::string remote_file_path(const Options& o) {
  if (!o.remote_file.empty()) return o.remote_file;
  std::string id = o.cluster_id_set ? o.cluster_id : "";
  std::string dir = o.remote_profile_dir.empty() ? "~/.ipython/profile_default" : o.remote_profile_dir;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir + "/security/" + conn::connection_file_name(id, "client");
}

// Passphrase-protected keys are skipped (never prompt): the agent is the way to use them.
int no_passphrase(const char*, char*, size_t, int, int, void*) { return -1; }

struct ssh_callbacks_struct g_callbacks = [] {
  struct ssh_callbacks_struct cb {};
  cb.auth_function = no_passphrase;
  ssh_callbacks_init(&cb);
  return cb;
}();

// libssh's own messages go through our log, at DEBUG only (an ssh config's LogLevel would
// otherwise print them on stderr).
void libssh_log(int priority, const char* function, const char* buffer, void*) {
  PXF_LOG(debug, "libssh") << "[" << priority << "] " << (function ? function : "") << ": " << (buffer ? buffer : "");
}

std::string take_string(char* s) {
  std::string out = s ? s : "";
  if (s) ssh_string_free_char(s);
  return out;
}

// ------------------------------------------------------------------------------------------
// One SSH session (connect, host key, auth, SFTP)
// ------------------------------------------------------------------------------------------

struct SessionFailure {
  std::string message;
  bool permanent = false;  // host key problems: retrying cannot help
};

class Session {
 public:
  explicit Session(const Options& o) : o_(o) {}
  ~Session() { close(); }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  ssh_session get() const { return s_; }
  std::string where() const { return where_; }  // "root@nodeA (10.200.0.1:22)"

  // Connects, checks the host key, authenticates. On failure returns it (and closes).
  std::optional<SessionFailure> open();
  void close();
  bool alive() const { return s_ && ssh_is_connected(s_) && !(ssh_get_status(s_) & (SSH_CLOSED | SSH_CLOSED_ERROR)); }
  std::string error() const { return s_ ? ssh_get_error(s_) : "no session"; }
  // Process whatever arrived on the socket (keepalive replies, window adjusts, channel data).
  int process() { return ev_ ? ssh_event_dopoll(ev_, 0) : SSH_ERROR; }

  enum class Fetch { ok, missing, error };
  Fetch fetch(const std::string& path, std::string& out, std::string& err);
  // Whether `path` still exists: 1 yes, 0 no, -1 cannot tell (no SFTP, error).
  int exists(const std::string& path);

 private:
  std::optional<SessionFailure> check_host_key();
  std::optional<SessionFailure> authenticate();
  std::string known_hosts_file() const;

  const Options& o_;
  ssh_session s_ = nullptr;
  ssh_event ev_ = nullptr;
  sftp_session sftp_ = nullptr;
  bool sftp_tried_ = false;
  std::string where_;
};

void Session::close() {
  if (sftp_) {
    sftp_free(sftp_);
    sftp_ = nullptr;
  }
  sftp_tried_ = false;
  if (ev_) {
    if (s_) ssh_event_remove_session(ev_, s_);
    ssh_event_free(ev_);
    ev_ = nullptr;
  }
  if (s_) {
    if (ssh_is_connected(s_)) ssh_disconnect(s_);
    ssh_free(s_);
    s_ = nullptr;
  }
}

std::string Session::known_hosts_file() const {
  if (!o_.known_hosts.empty()) return o_.known_hosts;
  char* kh = nullptr;
  std::string f;
  if (s_ && ssh_options_get(s_, SSH_OPTIONS_KNOWNHOSTS, &kh) == SSH_OK) f = take_string(kh);
  if (f.empty()) f = "%d/known_hosts";
  auto pos = f.find("%d");
  if (pos != std::string::npos) {
    const char* home = std::getenv("HOME");
    f.replace(pos, 2, std::string(home ? home : "~") + "/.ssh");
  }
  return f;
}

// The last non-empty line of a small text file ("" if none): an ssh client's final complaint.
std::string last_line_of(const std::string& path) {
  if (path.empty()) return "";
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return "";
  std::string last;
  char line[1024];
  while (std::fgets(line, sizeof line, f)) {
    std::string l(line);
    while (!l.empty() && (l.back() == '\n' || l.back() == '\r' || l.back() == ' ')) l.pop_back();
    if (!l.empty()) last = l;
  }
  std::fclose(f);
  return last;
}

std::optional<SessionFailure> Session::open() {
  close();
  s_ = ssh_new();
  if (!s_) return SessionFailure{"out of memory (ssh_new)", false};
  ssh_set_callbacks(s_, &g_callbacks);
  ssh_options_set(s_, SSH_OPTIONS_HOST, o_.host.c_str());
  // ssh's order: the ssh config first (-F or ~/.ssh/config), then the command line wins.
  if (!o_.config_file.empty()) {
    if (::access(o_.config_file.c_str(), R_OK) != 0) {
      close();
      throw Fatal("cannot read the ssh config " + o_.config_file + ": " + std::strerror(errno));
    }
    if (ssh_options_parse_config(s_, o_.config_file.c_str()) != 0) {
      std::string e = error();
      close();
      throw Fatal("cannot parse the ssh config " + o_.config_file + ": " + e);
    }
  } else {
    ssh_options_parse_config(s_, nullptr);  // ~/.ssh/config and /etc/ssh/ssh_config
  }
  if (!o_.user.empty()) ssh_options_set(s_, SSH_OPTIONS_USER, o_.user.c_str());
  if (o_.port) {
    unsigned int p = static_cast<unsigned int>(o_.port);
    ssh_options_set(s_, SSH_OPTIONS_PORT, &p);
  }
  for (const auto& id : o_.identities) ssh_options_set(s_, SSH_OPTIONS_IDENTITY, id.c_str());
  if (!o_.known_hosts.empty()) ssh_options_set(s_, SSH_OPTIONS_KNOWNHOSTS, o_.known_hosts.c_str());
  // We check the host key ourselves, always (`StrictHostKeyChecking no` in an ssh config would
  // make libssh report every key as known).
  int strict = 1;
  ssh_options_set(s_, SSH_OPTIONS_STRICTHOSTKEYCHECK, &strict);
  std::string jump_errors;  // what `ssh -W` said (why the jump host refused), read on failure
  if (!o_.jump.empty()) {
    // libssh 0.10 implements ProxyJump by running `ssh -W`; do the same, never prompting.
    std::string cmd = "ssh -o BatchMode=yes";
    if (!o_.config_file.empty()) cmd += " -F " + shell_quote(o_.config_file);
    cmd += " -W '[%h]:%p' " + shell_quote(o_.jump);
    char tmpl[] = "/tmp/pxtunnel-jump-XXXXXX";
    int efd = mkstemp(tmpl);
    if (efd >= 0) {
      ::close(efd);
      jump_errors = tmpl;
      cmd += " 2>" + shell_quote(jump_errors);
    }
    ssh_options_set(s_, SSH_OPTIONS_PROXYCOMMAND, cmd.c_str());
  }
  // The jump's error file is only needed until the session is up (or has failed).
  struct RemoveFile {
    std::string path;
    ~RemoveFile() {
      if (!path.empty()) ::unlink(path.c_str());
    }
  } remove_jump_errors{jump_errors};
  // libssh's own messages (the config's LogLevel sets them too) only with --log-level=DEBUG.
  int verbosity = pxf::log::enabled(pxf::log::debug) ? SSH_LOG_WARN : SSH_LOG_NOLOG;
  ssh_options_set(s_, SSH_OPTIONS_LOG_VERBOSITY, &verbosity);
  long timeout = o_.connect_timeout;
  ssh_options_set(s_, SSH_OPTIONS_TIMEOUT, &timeout);
  int nodelay = 1;
  ssh_options_set(s_, SSH_OPTIONS_NODELAY, &nodelay);

  char* h = nullptr;
  std::string real_host = ssh_options_get(s_, SSH_OPTIONS_HOST, &h) == SSH_OK ? take_string(h) : o_.host;
  char* u = nullptr;
  std::string user = ssh_options_get(s_, SSH_OPTIONS_USER, &u) == SSH_OK ? take_string(u) : "";
  unsigned int port = 22;
  ssh_options_get_port(s_, &port);
  where_ = (user.empty() ? "" : user + "@") + o_.host;
  if (real_host != o_.host || port != 22) where_ += " (" + real_host + ":" + std::to_string(port) + ")";

  if (ssh_connect(s_) != SSH_OK) {
    std::string jump_said = last_line_of(jump_errors);
    SessionFailure f{!jump_said.empty()
                         ? "cannot connect to " + where_ + " through the jump host " + o_.jump +
                               ": ssh to the jump host said \"" + jump_said + "\". Check that `ssh -J " + o_.jump +
                               " " + o_.host + "` works (keys, user, known_hosts of the jump host)."
                         : "cannot connect to " + where_ + ": " + error() +
                               ". Check the host name, that sshd runs there, and the network path "
                               "(ProxyJump/-J for a host behind a login node).",
                     false};
    close();
    return f;
  }
  // Keep the session alive and notice a dead peer: TCP keepalive and a send timeout.
  int fd = ssh_get_fd(s_);
  if (fd >= 0) {
    int on = 1, idle = 10, intvl = 5, cnt = 3;
    unsigned int user_timeout = 30000;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof user_timeout);
  }
  if (auto f = check_host_key()) {
    close();
    return f;
  }
  if (auto f = authenticate()) {
    close();
    return f;
  }
  ev_ = ssh_event_new();
  if (!ev_ || ssh_event_add_session(ev_, s_) != SSH_OK) {
    close();
    return SessionFailure{"cannot set up the event loop for " + where_, false};
  }
  return std::nullopt;
}

std::optional<SessionFailure> Session::check_host_key() {
  ssh_key key = nullptr;
  if (ssh_get_server_publickey(s_, &key) != SSH_OK)
    return SessionFailure{"cannot get the host key of " + where_ + ": " + error(), false};
  unsigned char* hash = nullptr;
  size_t hlen = 0;
  std::string fp = "(unknown)";
  if (ssh_get_publickey_hash(key, SSH_PUBLICKEY_HASH_SHA256, &hash, &hlen) == 0) {
    fp = take_string(ssh_get_fingerprint_hash(SSH_PUBLICKEY_HASH_SHA256, hash, hlen));
    ssh_clean_pubkey_hash(&hash);
  }
  const char* type_c = ssh_key_type_to_char(ssh_key_type(key));
  std::string type = type_c ? type_c : "?";
  ssh_key_free(key);
  const std::string file = known_hosts_file();
  switch (ssh_session_is_known_server(s_)) {
  case SSH_KNOWN_HOSTS_OK: return std::nullopt;
  case SSH_KNOWN_HOSTS_CHANGED:
  case SSH_KNOWN_HOSTS_OTHER:
    return SessionFailure{"the host key of " + where_ + " has CHANGED: it now offers " + type + " key " + fp +
                              ", which does not match " + file +
                              ". Someone may be intercepting the connection (or the host was reinstalled). "
                              "Refusing; if the change is expected, remove the old entry (ssh-keygen -R " +
                              o_.host + " -f " + file + ") and connect again.",
                          true};
  case SSH_KNOWN_HOSTS_NOT_FOUND:
  case SSH_KNOWN_HOSTS_UNKNOWN:
    if (o_.accept_new) {
      if (ssh_session_update_known_hosts(s_) != SSH_OK)
        return SessionFailure{
            "cannot record the host key of " + where_ + " (" + type + " " + fp + ") in " + file + ": " + error(), true};
      PXF_LOG(warning, kComponent) << "recorded the new host key of " << where_ << " (" << type << " " << fp << ") in "
                                   << file;
      return std::nullopt;
    }
    return SessionFailure{"the host key of " + where_ + " is unknown (not in " + file + "): it offers " + type +
                              " key " + fp +
                              ". Check the fingerprint with the host's admin, then run "
                              "`ssh " +
                              o_.target +
                              "` once to record it, or pass "
                              "--accept-new-host-key" +
                              (file == "/dev/null" ? " (your ssh config sets UserKnownHostsFile /dev/null: "
                                                     "pass --known-hosts FILE to keep the key)."
                                                   : "."),
                          true};
  case SSH_KNOWN_HOSTS_ERROR:
  default:
    return SessionFailure{
        "cannot check the host key of " + where_ + " (" + type + " " + fp + ") against " + file + ": " + error(), true};
  }
}

std::optional<SessionFailure> Session::authenticate() {
  int rc = ssh_userauth_none(s_, nullptr);
  if (rc == SSH_AUTH_SUCCESS) return std::nullopt;
  if (rc == SSH_AUTH_ERROR) return SessionFailure{"login to " + where_ + " failed: " + error(), false};
  rc = ssh_userauth_publickey_auto(s_, nullptr, nullptr);
  if (rc == SSH_AUTH_SUCCESS) return std::nullopt;
  if (rc == SSH_AUTH_ERROR) return SessionFailure{"login to " + where_ + " failed: " + error(), false};
  int methods = ssh_userauth_list(s_, nullptr);
  const char* agent = std::getenv("SSH_AUTH_SOCK");
  std::string offered = agent && *agent ? std::string("the keys of ssh-agent ($SSH_AUTH_SOCK=") + agent + ")"
                                        : std::string("no ssh-agent ($SSH_AUTH_SOCK is not set)");
  offered += ", ";
  if (!o_.identities.empty()) {
    offered += "-i";
    for (const auto& i : o_.identities) offered += " " + i;
    offered += " and ";
  }
  offered += "the IdentityFile/default keys of the ssh config";
  std::string msg = "login to " + where_ + " refused: the server accepted none of our keys (" + offered +
                    "). Add your public key to ~/.ssh/authorized_keys there, load the "
                    "key into ssh-agent, or pass -i KEY (keys with a passphrase are only used "
                    "through the agent: pxtunnel never prompts)";
  if (!(methods & SSH_AUTH_METHOD_PUBLICKEY))
    msg += "; note that the server does not offer public-key authentication at all";
  return SessionFailure{msg + ".", false};
}

Session::Fetch Session::fetch(const std::string& path, std::string& out, std::string& err) {
  out.clear();
  const std::string sp = server_path(path);
  if (!sftp_tried_) {
    sftp_tried_ = true;
    sftp_ = sftp_new(s_);
    if (sftp_ && sftp_init(sftp_) != SSH_OK) {
      PXF_LOG(info, kComponent) << "no SFTP on " << where_ << " (" << error() << "): using cat";
      sftp_free(sftp_);
      sftp_ = nullptr;
    }
  }
  if (sftp_) {
    sftp_file f = sftp_open(sftp_, sp.c_str(), O_RDONLY, 0);
    if (!f) {
      int e = sftp_get_error(sftp_);
      if (e == SSH_FX_NO_SUCH_FILE || e == SSH_FX_NO_SUCH_PATH) return Fetch::missing;
      err = "SFTP error " + std::to_string(e) + ": " + error();
      return Fetch::error;
    }
    char buf[16384];
    ssize_t n;
    while ((n = sftp_read(f, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
    sftp_close(f);
    if (n < 0) {
      err = "SFTP read failed: " + error();
      return Fetch::error;
    }
    return Fetch::ok;
  }
  ssh_channel ch = ssh_channel_new(s_);
  if (!ch || ssh_channel_open_session(ch) != SSH_OK) {
    err = "cannot open a session channel: " + error();
    if (ch) ssh_channel_free(ch);
    return Fetch::error;
  }
  std::string cmd = "cat -- " + shell_quote(sp);
  if (ssh_channel_request_exec(ch, cmd.c_str()) != SSH_OK) {
    err = "cannot run `" + cmd + "`: " + error();
    ssh_channel_free(ch);
    return Fetch::error;
  }
  char buf[16384];
  std::string errtext;
  for (;;) {
    int n = ssh_channel_read_timeout(ch, buf, sizeof buf, 0, 10000);
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
      continue;
    }
    int m = ssh_channel_read_timeout(ch, buf, sizeof buf, 1, 1000);
    if (m > 0) errtext.append(buf, static_cast<size_t>(m));
    if (n < 0 || ssh_channel_is_eof(ch)) break;
    if (n == 0 && m <= 0 && !ssh_channel_is_open(ch)) break;
  }
  ssh_channel_send_eof(ch);
  int status = ssh_channel_get_exit_status(ch);
  ssh_channel_close(ch);
  ssh_channel_free(ch);
  if (status != 0) {
    if (errtext.find("No such file") != std::string::npos) return Fetch::missing;
    err = "`" + cmd + "` failed (status " + std::to_string(status) + "): " + errtext;
    return Fetch::error;
  }
  return Fetch::ok;
}

int Session::exists(const std::string& path) {
  if (!sftp_) return -1;
  sftp_attributes a = sftp_stat(sftp_, server_path(path).c_str());
  if (a) {
    sftp_attributes_free(a);
    return 1;
  }
  int e = sftp_get_error(sftp_);
  return (e == SSH_FX_NO_SUCH_FILE || e == SSH_FX_NO_SUCH_PATH) ? 0 : -1;
}

// ------------------------------------------------------------------------------------------
// Ports and forwarding
// ------------------------------------------------------------------------------------------

struct Port {
  int remote = 0;  // the controller's port
  int local = 0;   // our listener on 127.0.0.1
  int listen_fd = -1;
};

struct Conn {
  int fd = -1;
  ssh_channel ch = nullptr;
  std::string out;  // channel -> local, not yet sent
  size_t off = 0;
  bool dead = false;
};

int listen_local(int want, int& got, std::string& err) {
  for (int attempt : {want, 0}) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      err = std::strerror(errno);
      return -1;
    }
    int on = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(attempt));
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::listen(fd, 128) == 0) {
      socklen_t len = sizeof a;
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
      got = ntohs(a.sin_port);
      return fd;
    }
    err = std::strerror(errno);
    ::close(fd);
    if (attempt != 0)
      PXF_LOG(info, kComponent) << "127.0.0.1:" << want << " is taken (" << err << "): using a free port instead";
  }
  return -1;
}

// The host the SSH server should connect to for the file's `interface`: an explicit address as
// is; a wildcard (`tcp://*`, the controller listens everywhere) is the SSH host's own 127.0.0.1
// when the file's `location` is empty or names the SSH host, else `location` (the controller
// runs on another machine, reached from the SSH host), as the stock disambiguation does.
std::string forward_host(const conn::ClientInfo& info, const Options& o, const std::string& real_host) {
  std::string iface = info.interface;
  if (iface.rfind("tcp://", 0) == 0) iface = iface.substr(6);
  if (!iface.empty() && iface.front() == '[' && iface.back() == ']') iface = iface.substr(1, iface.size() - 2);
  if (!conn::is_wildcard(iface)) return iface;
  if (info.location.empty() || info.location == o.host || info.location == real_host || info.location == "localhost")
    return "127.0.0.1";
  // the short name of the SSH host (login.cluster.org vs login)
  auto shortname = [](const std::string& h) { return h.substr(0, h.find('.')); };
  if (shortname(info.location) == shortname(o.host)) return "127.0.0.1";
  return info.location;
}

std::vector<int> client_ports(const conn::ClientInfo& c) {
  return {c.registration, c.control, c.mux, c.task, c.iopub, c.notification, c.broadcast};
}

class Tunnel {
 public:
  explicit Tunnel(Options o) : o_(std::move(o)), ssh_(o_) {}
  ~Tunnel();
  Tunnel(const Tunnel&) = delete;
  Tunnel& operator=(const Tunnel&) = delete;
  int run();

 private:
  conn::ClientInfo fetch_info(bool first);
  void set_targets(const conn::ClientInfo& info);
  void write_local_file();
  void remove_local_file();
  void drop_session(const std::string& why);
  void close_conn(Conn& c);
  void accept_on(Port& p);
  bool pump();  // returns true if anything moved

  Options o_;
  Session ssh_;
  std::string remote_path_;
  conn::ClientInfo remote_;
  std::string dest_host_;
  std::map<int, Port> ports_;  // remote port -> listener
  std::vector<std::unique_ptr<Conn>> conns_;
  fs::path local_file_;
  bool wrote_local_ = false;
  std::vector<char> buf_ = std::vector<char>(kChunk);
};

// Also on an error exit: nothing is left behind.
Tunnel::~Tunnel() {
  for (auto& c : conns_) close_conn(*c);
  conns_.clear();
  ssh_.close();
  for (auto& [rp, p] : ports_) ::close(p.listen_fd);
  ports_.clear();
  remove_local_file();
}

conn::ClientInfo Tunnel::fetch_info(bool first) {
  std::string text, err;
  switch (ssh_.fetch(remote_path_, text, err)) {
  case Session::Fetch::ok: break;
  case Session::Fetch::missing:
    throw Fatal("no connection file at " + o_.host + ":" + remote_path_ +
                    ": is the controller running there, with this profile/cluster id?" +
                    (first ? "" : " (it was there before: the controller stopped)"),
                first ? kExitError : kExitControllerGone);
  case Session::Fetch::error: throw Fatal("cannot read " + o_.host + ":" + remote_path_ + ": " + err);
  }
  const std::string source = o_.host + ":" + remote_path_;
  try {
    return conn::client_from_json(conn::json::parse(text), source);
  } catch (const conn::json::exception& e) {
    throw Fatal(source + " is not a connection file (invalid JSON: " + e.what() + ")");
  } catch (const conn::ConnectionFileError& e) {
    throw Fatal(e.what());
  }
}

void Tunnel::set_targets(const conn::ClientInfo& info) {
  char* h = nullptr;
  std::string real_host =
      ssh_.get() && ssh_options_get(ssh_.get(), SSH_OPTIONS_HOST, &h) == SSH_OK ? take_string(h) : o_.host;
  remote_ = info;
  dest_host_ = forward_host(info, o_, real_host);
  std::map<int, Port> next;
  for (int rp : client_ports(info)) {
    if (next.count(rp)) continue;
    auto it = ports_.find(rp);
    if (it != ports_.end()) {
      next[rp] = it->second;
      ports_.erase(it);
      continue;
    }
    // A new remote port (the first fetch, or a restarted controller that picked other ports):
    // a new listener. Listeners of ports the file no longer has are closed below.
    Port p;
    p.remote = rp;
    std::string err;
    p.listen_fd = listen_local(rp, p.local, err);
    if (p.listen_fd < 0) throw Fatal("cannot listen on 127.0.0.1 for port " + std::to_string(rp) + ": " + err);
    next[rp] = p;
  }
  for (auto& [rp, p] : ports_) ::close(p.listen_fd);  // ports the new file does not have
  ports_ = std::move(next);
}

void Tunnel::write_local_file() {
  conn::ClientInfo local = remote_;
  local.interface = "tcp://127.0.0.1";
  // This machine's name: the stock client then sees a loopback controller that is local (with
  // the remote name it would warn that it needs sshserver=).
  char hn[256] = {};
  ::gethostname(hn, sizeof hn - 1);
  local.location = hn;
  local.ssh = "";
  auto lp = [&](int rp) { return ports_.at(rp).local; };
  local.registration = lp(remote_.registration);
  local.control = lp(remote_.control);
  local.mux = lp(remote_.mux);
  local.task = lp(remote_.task);
  local.iopub = lp(remote_.iopub);
  local.notification = lp(remote_.notification);
  local.broadcast = lp(remote_.broadcast);
  conn::ProfileLocation loc{fs::path(local_file_).parent_path().parent_path(), o_.cluster_id};
  conn::ensure_profile_dirs(loc);
  conn::write_client_file(local_file_, local);
  wrote_local_ = true;
}

void Tunnel::remove_local_file() {
  if (!wrote_local_) return;
  std::error_code ec;
  fs::remove(local_file_, ec);
  wrote_local_ = false;
}

void Tunnel::close_conn(Conn& c) {
  if (c.ch) {
    if (ssh_.alive()) {
      ssh_channel_send_eof(c.ch);
      ssh_channel_close(c.ch);
    }
    ssh_channel_free(c.ch);
    c.ch = nullptr;
  }
  if (c.fd >= 0) ::close(c.fd);
  c.fd = -1;
  c.dead = true;
}

void Tunnel::drop_session(const std::string& why) {
  PXF_LOG(warning, kComponent) << "SSH session to " << ssh_.where() << " lost (" << why << "); closing "
                               << conns_.size() << " forwarded connection(s) and reconnecting";
  for (auto& c : conns_) {
    if (c->ch) ssh_channel_free(c->ch);  // no messages: the session is gone
    c->ch = nullptr;
    close_conn(*c);
  }
  conns_.clear();
  ssh_.close();
}

void Tunnel::accept_on(Port& p) {
  for (;;) {
    int fd = ::accept4(p.listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;  // EAGAIN or a transient error: poll again
    int on = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    ssh_channel ch = ssh_channel_new(ssh_.get());
    if (!ch || ssh_channel_open_forward(ch, dest_host_.c_str(), p.remote, "127.0.0.1", p.local) != SSH_OK) {
      PXF_LOG(warning, kComponent) << o_.host << " could not connect to " << dest_host_ << ":" << p.remote
                                   << " for us: " << ssh_.error();
      if (ch) ssh_channel_free(ch);
      ::close(fd);
      return;
    }
    auto c = std::make_unique<Conn>();
    c->fd = fd;
    c->ch = ch;
    conns_.push_back(std::move(c));
    PXF_LOG(debug, kComponent) << "127.0.0.1:" << p.local << " -> " << o_.host << " -> " << dest_host_ << ":"
                               << p.remote;
  }
}

bool Tunnel::pump() {
  bool moved = false;
  for (auto& cp : conns_) {
    Conn& c = *cp;
    if (c.dead) continue;
    // channel -> local (only when the previous chunk is gone: backpressure via the SSH window)
    if (c.off >= c.out.size()) {
      c.out.clear();
      c.off = 0;
      int n = ssh_channel_read_nonblocking(c.ch, buf_.data(), static_cast<uint32_t>(buf_.size()), 0);
      if (n > 0) {
        c.out.assign(buf_.data(), static_cast<size_t>(n));
        moved = true;
      } else if (n == SSH_ERROR || (n == 0 && ssh_channel_is_eof(c.ch))) {
        c.dead = true;
      }
    }
    while (c.off < c.out.size()) {
      ssize_t w = ::send(c.fd, c.out.data() + c.off, c.out.size() - c.off, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w > 0) {
        c.off += static_cast<size_t>(w);
        moved = true;
      } else {
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) c.dead = true;
        break;
      }
    }
    if (c.dead && c.off >= c.out.size()) close_conn(c);
    else if (c.dead) c.dead = false;  // flush what is left first; EOF seen again next time
  }
  return moved;
}

int Tunnel::run() {
  remote_path_ = remote_file_path(o_);
  {
    fs::path dir = o_.local_profile_dir.empty() ? conn::ipython_dir() / ("profile_" + o_.host)
                                                : fs::absolute(o_.local_profile_dir);
    local_file_ = conn::ProfileLocation{dir, o_.cluster_id}.client_file();
  }
  if (auto f = ssh_.open()) throw Fatal(f->message);
  remote_ = fetch_info(true);
  set_targets(remote_);
  write_local_file();
  PXF_LOG(info, kComponent) << "fetched " << remote_path_ << " from " << ssh_.where() << " (controller on "
                            << (remote_.location.empty() ? "?" : remote_.location) << ", " << ports_.size()
                            << " ports via " << dest_host_ << ")";
  std::printf("pxtunnel: forwarding %zu ports of %s:%s through one SSH session (pid %d); local file %s\n",
              ports_.size(), o_.host.c_str(), remote_path_.c_str(), static_cast<int>(::getpid()), local_file_.c_str());
  std::fflush(stdout);

  bool connected = true;
  double backoff = 0.5;
  auto next_attempt = Clock::now();
  auto last_ignore = Clock::now();
  auto last_check = Clock::now();
  bool moved = false;
  int exit_code = 0;
  while (!g_stop) {
    auto now = Clock::now();
    if (!connected) {
      if (now >= next_attempt) {
        auto f = ssh_.open();
        if (!f) {
          conn::ClientInfo info = fetch_info(false);  // missing now: the controller is gone
          if (!(info == remote_)) {
            PXF_LOG(warning, kComponent) << "the connection file " << remote_path_
                                         << " changed (controller restarted): updating " << local_file_;
            set_targets(info);
            write_local_file();
          }
          connected = true;
          backoff = 0.5;
          PXF_LOG(warning, kComponent) << "reconnected to " << ssh_.where();
          last_ignore = last_check = Clock::now();
        } else if (f->permanent) {
          throw Fatal(f->message);
        } else {
          PXF_LOG(warning, kComponent) << f->message << " (retrying in " << backoff << " s)";
          next_attempt = Clock::now() + std::chrono::milliseconds(static_cast<int>(backoff * 1000));
          backoff = std::min(backoff * 2, 10.0);
        }
      }
      if (!connected) {
        // Listeners stay but are not polled: new local connections wait in the backlog.
        auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next_attempt - Clock::now()).count();
        ::poll(nullptr, 0, static_cast<int>(std::clamp<long long>(wait, 0, 200)));
        continue;
      }
    }

    std::vector<pollfd> fds;
    fds.push_back({ssh_get_fd(ssh_.get()), POLLIN, 0});
    for (auto& [rp, p] : ports_) fds.push_back({p.listen_fd, POLLIN, 0});
    for (auto& c : conns_)
      fds.push_back({c->fd, static_cast<short>(POLLIN | (c->off < c->out.size() ? POLLOUT : 0)), 0});
    // libssh may have read channel data into its own buffers while doing something else (an
    // SFTP stat, a write that processed incoming packets): the session fd is then quiet though
    // data waits, so such a channel means "do not sleep" (it cost a 500 ms stall per check).
    bool buffered = false;
    for (auto& c : conns_)
      if (!c->dead && c->off >= c->out.size() && ssh_channel_poll(c->ch, 0) > 0) {
        buffered = true;
        break;
      }
    int rc = ::poll(fds.data(), fds.size(), moved || buffered ? 0 : 500);
    if (rc < 0 && errno != EINTR) throw Fatal(std::string("poll: ") + std::strerror(errno));
    if (g_stop) break;
    moved = false;

    if (fds[0].revents) {
      if (ssh_.process() == SSH_ERROR && !ssh_.alive()) {
        drop_session(ssh_.error());
        connected = false;
        next_attempt = Clock::now();
        continue;
      }
    }
    size_t i = 1;
    for (auto& [rp, p] : ports_) {
      if (fds[i++].revents & POLLIN) accept_on(p);
    }
    // local -> channel
    size_t nconn = fds.size() - i;
    for (size_t k = 0; k < nconn && k < conns_.size(); ++k) {
      Conn& c = *conns_[k];
      short re = fds[i + k].revents;
      if (c.dead || !(re & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t n = ::recv(c.fd, buf_.data(), buf_.size(), 0);
      if (n > 0) {
        size_t done = 0;
        while (done < static_cast<size_t>(n)) {
          int w = ssh_channel_write(c.ch, buf_.data() + done, static_cast<uint32_t>(n - done));
          if (w == SSH_ERROR || w < 0) {
            c.dead = true;
            break;
          }
          done += static_cast<size_t>(w);
        }
        moved = true;
      } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        c.dead = true;
      }
      if (c.dead) close_conn(c);
    }
    if (pump()) moved = true;
    conns_.erase(std::remove_if(conns_.begin(), conns_.end(), [](const auto& c) { return c->fd < 0; }), conns_.end());
    if (!ssh_.alive()) {
      drop_session(ssh_.error());
      connected = false;
      next_attempt = Clock::now();
      continue;
    }
    now = Clock::now();
    if (now - last_ignore > std::chrono::seconds(10)) {
      ssh_send_ignore(ssh_.get(), "pxtunnel keepalive");
      last_ignore = now;
    }
    if (now - last_check > std::chrono::seconds(5)) {
      last_check = now;
      int e = ssh_.exists(remote_path_);
      if (e == 0) {
        PXF_LOG(warning, kComponent) << "the controller's connection file " << o_.host << ":" << remote_path_
                                     << " is gone: the controller stopped; exiting";
        exit_code = kExitControllerGone;
        break;
      }
      if (!ssh_.alive()) {
        drop_session(ssh_.error());
        connected = false;
        next_attempt = Clock::now();
      }
    }
  }
  if (g_stop) PXF_LOG(info, kComponent) << "signal " << static_cast<int>(g_stop) << ": closing the tunnel";
  for (auto& c : conns_) close_conn(*c);
  conns_.clear();
  ssh_.close();
  for (auto& [rp, p] : ports_) ::close(p.listen_fd);
  ports_.clear();
  remove_local_file();
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  pxf::log::set_name("pxtunnel");
  Options o = parse_args(argc, argv);
  pxf::log::set_level(o.log_level);

  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: poll() returns at once
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGHUP, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);

  ssh_set_log_callback(libssh_log);
  if (ssh_init() != SSH_OK) {
    std::fprintf(stderr, "pxtunnel: cannot initialise libssh\n");
    return kExitError;
  }
  Tunnel t(o);
  int rc = kExitError;
  try {
    rc = t.run();
  } catch (const Fatal& e) {
    std::fprintf(stderr, "pxtunnel: error: %s\n", e.what());
    rc = e.code;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pxtunnel: error: %s\n", e.what());
    rc = kExitError;
  }
  ssh_finalize();
  return rc;
}
