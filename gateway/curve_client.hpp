#pragma once
// The client side of CurveZMQ for the link's sockets: the controller's public key (the
// connection file's `curve_serverkey`) and a keypair made for this job, as the stock engine
// makes one when it has none.
#include <zmq.hpp>

#include <stdexcept>
#include <string>

namespace pxf::gateway {

struct CurveClient {
  std::string serverkey, publickey, secretkey;  // Z85; serverkey "" = CurveZMQ off

  static CurveClient for_server(const std::string& serverkey) {
    CurveClient c;
    c.serverkey = serverkey;
    if (serverkey.empty()) return c;
    char pub[41] = {}, sec[41] = {};
    if (zmq_curve_keypair(pub, sec) != 0)
      throw std::runtime_error("the controller uses CurveZMQ (curve_serverkey in the connection file) but this "
                               "libzmq cannot make Curve keys: " +
                               std::string(zmq_strerror(zmq_errno())));
    c.publickey = pub;
    c.secretkey = sec;
    return c;
  }
  // Before connect().
  void apply(zmq::socket_t& s) const {
    if (serverkey.empty()) return;
    s.set(zmq::sockopt::curve_serverkey, serverkey);
    s.set(zmq::sockopt::curve_publickey, publickey);
    s.set(zmq::sockopt::curve_secretkey, secretkey);
  }
};

}  // namespace pxf::gateway
