#include "gateway/ssh_tunnel.hpp"

#include "gateway/gateway.hpp"  // GatewayError

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

namespace pxf::gateway {

namespace {

int free_local_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw GatewayError("ssh tunnel: cannot create a socket to find a free local port");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  ::close(fd);
  if (!port) throw GatewayError("ssh tunnel: no free local port on 127.0.0.1");
  return port;
}

bool accepts(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  return s;
}

// $PXF_SSH as a command line ("ssh -F /path/cluster.cfg", like Open MPI's plm_rsh_agent or git's
// GIT_SSH_COMMAND): words split on blanks, '...' and "..." quote, a backslash escapes the next
// character outside single quotes. No expansion of variables or ~.
std::vector<std::string> split_command(const std::string& s) {
  std::vector<std::string> words;
  std::string cur;
  bool in_word = false;
  char quote = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (quote) {
      if (c == quote) {
        quote = 0;
      } else if (c == '\\' && quote == '"' && i + 1 < s.size()) {
        cur += s[++i];
      } else {
        cur += c;
      }
    } else if (c == '\'' || c == '"') {
      quote = c;
      in_word = true;
    } else if (c == '\\' && i + 1 < s.size()) {
      cur += s[++i];
      in_word = true;
    } else if (c == ' ' || c == '\t' || c == '\n') {
      if (in_word) words.push_back(cur);
      cur.clear();
      in_word = false;
    } else {
      cur += c;
      in_word = true;
    }
  }
  if (in_word) words.push_back(cur);
  return words;
}

}  // namespace

SshTunnel::SshTunnel(const std::string& server, const std::string& keyfile, const std::string& remote_host,
                     int remote_port, double timeout_s) {
  std::string host = server, port;
  // "[user@]host[:port]", as ipyparallel's sshserver
  if (auto colon = host.rfind(':'); colon != std::string::npos && host.find(']') == std::string::npos) {
    port = host.substr(colon + 1);
    host = host.substr(0, colon);
  }
  local_port_ = free_local_port();
  // $PXF_SSH: the ssh command (program and options, e.g. "ssh -F cluster.cfg"); default ssh.
  const char* ssh = std::getenv("PXF_SSH");
  std::vector<std::string> args = split_command(ssh ? ssh : "");
  if (args.empty()) args.push_back("ssh");
  args.insert(args.end(),
              {"-N", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=15", "-L",
               "127.0.0.1:" + std::to_string(local_port_) + ":" + remote_host + ":" + std::to_string(remote_port)});
  if (!port.empty()) args.insert(args.end(), {"-p", port});
  if (!keyfile.empty()) args.insert(args.end(), {"-i", keyfile});
  args.push_back(host);

  char tmpl[] = "/tmp/pxf-ssh-tunnel-XXXXXX";
  int err_fd = ::mkstemp(tmpl);
  std::string err_path = tmpl;
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int null_fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  pid_ = ::fork();
  if (pid_ == 0) {
    // The child: only async-signal-safe calls until exec. The forward dies with this rank
    // (the thread that forked it is the main thread, which lives as long as the process).
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (null_fd >= 0) {
      ::dup2(null_fd, 0);
      ::dup2(null_fd, 1);
    }
    if (err_fd >= 0) ::dup2(err_fd, 2);
    ::setpgid(0, 0);  // a ^C at the terminal goes to the job, not to its tunnel
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  if (null_fd >= 0) ::close(null_fd);
  if (err_fd >= 0) ::close(err_fd);
  if (pid_ < 0) {
    ::unlink(err_path.c_str());
    throw GatewayError("ssh tunnel to " + server + ": cannot fork");
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (;;) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      std::string why = read_all(err_path);
      ::unlink(err_path.c_str());
      throw GatewayError("ssh tunnel through " + server + " to " + remote_host + ":" + std::to_string(remote_port) +
                         " failed (ssh exited with status " + std::to_string(WEXITSTATUS(status)) +
                         (WEXITSTATUS(status) == 127 ? ", '" + args[0] + "' not found: install OpenSSH's client" : "") +
                         (why.empty() ? "" : ": " + why) + "); check that `ssh " + server +
                         "` logs in without a prompt (key or agent)");
    }
    if (accepts(local_port_)) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      stop();
      std::string why = read_all(err_path);
      ::unlink(err_path.c_str());
      throw GatewayError("ssh tunnel through " + server + " was not up within " +
                         std::to_string(static_cast<int>(timeout_s)) + " s" + (why.empty() ? "" : ": " + why));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::unlink(err_path.c_str());
}

SshTunnel::~SshTunnel() { stop(); }

void SshTunnel::stop() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGTERM);
  for (int i = 0; i < 40; ++i) {
    if (::waitpid(pid_, nullptr, WNOHANG) == pid_) {
      pid_ = -1;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

}  // namespace pxf::gateway
