#pragma once
// An OpenSSH port forward for an engine job whose controller is reached through an SSH server
// (the engine file's `ssh`, ipcontroller --enginessh, ipengine --ssh/--sshkey). Like the stock
// engine (zmq.ssh.tunnel), it runs the user's `ssh` so their ~/.ssh/config, agent and keys
// apply; unlike it, one `ssh -N -L` process per forwarded port, owned by PID, stopped with the
// job (no `sleep 60` left behind). Never prompts: BatchMode, so a missing key is an error.
// $PXF_SSH replaces `ssh`: a command line split into words ("ssh -F /path/cfg -o Opt=v").
#include <string>
#include <sys/types.h>

namespace pxf::gateway {

class SshTunnel {
 public:
  // Forwards 127.0.0.1:<free port> through `server` ("[user@]host[:port]") to
  // `remote_host:remote_port` as seen from the server. Waits until the forward accepts
  // connections (at most timeout_s). Throws GatewayError naming the server and ssh's own words.
  SshTunnel(const std::string& server, const std::string& keyfile, const std::string& remote_host, int remote_port,
            double timeout_s);
  ~SshTunnel();
  SshTunnel(const SshTunnel&) = delete;
  SshTunnel& operator=(const SshTunnel&) = delete;

  int local_port() const { return local_port_; }
  std::string local_url() const { return "tcp://127.0.0.1:" + std::to_string(local_port_); }

 private:
  void stop();
  pid_t pid_ = -1;
  int local_port_ = 0;
};

}  // namespace pxf::gateway
