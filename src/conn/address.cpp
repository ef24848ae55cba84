#include "conn/address.hpp"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>

namespace pxf::conn {

namespace {

std::string this_hostname() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "";
  return buf;
}

bool is_ip_literal(const std::string& s) {
  in_addr a4{};
  in6_addr a6{};
  return inet_pton(AF_INET, s.c_str(), &a4) == 1 || inet_pton(AF_INET6, s.c_str(), &a6) == 1;
}

bool is_loopback(const std::string& ip) { return ip.rfind("127.", 0) == 0 || ip == "::1"; }

}  // namespace

bool is_wildcard(const std::string& ip) { return ip.empty() || ip == "*" || ip == "0.0.0.0" || ip == "::"; }

std::vector<std::string> local_ips() {
  std::vector<std::string> out;
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return out;
  for (ifaddrs* it = list; it; it = it->ifa_next) {
    if (!it->ifa_addr) continue;
    char buf[INET6_ADDRSTRLEN] = {};
    if (it->ifa_addr->sa_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(it->ifa_addr)->sin_addr, buf, sizeof buf);
    } else if (it->ifa_addr->sa_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(it->ifa_addr)->sin6_addr, buf, sizeof buf);
    } else {
      continue;
    }
    if (std::find(out.begin(), out.end(), buf) == out.end()) out.emplace_back(buf);
  }
  freeifaddrs(list);
  return out;
}

std::string ip_for_host(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0 || !res) return "";
  char buf[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr, buf, sizeof buf);
  freeaddrinfo(res);
  return buf;
}

std::string disambiguate_ip_address(const std::string& ip, const std::string& location) {
  if (!is_wildcard(ip)) return ip;
  const std::string localhost = "127.0.0.1";
  if (location.empty() || location == this_hostname()) return localhost;
  std::string addr = is_ip_literal(location) ? location : ip_for_host(location);
  if (addr.empty()) return location;  // stock: the location, unresolved, is the best guess
  if (!is_loopback(addr)) {
    auto mine = local_ips();
    if (std::find(mine.begin(), mine.end(), addr) != mine.end()) return localhost;
  }
  return addr;
}

std::string disambiguate_url(const std::string& url, const std::string& location) {
  auto scheme = url.find("://");
  if (scheme == std::string::npos || url.compare(0, scheme, "tcp") != 0) return url;
  auto colon = url.rfind(':');
  if (colon == std::string::npos || colon <= scheme + 2) return url;
  std::string host = url.substr(scheme + 3, colon - scheme - 3);
  return "tcp://" + disambiguate_ip_address(host, location) + url.substr(colon);
}

std::string disambiguate_interface(const std::string& interface, const std::string& location) {
  auto scheme = interface.find("://");
  if (scheme == std::string::npos || interface.compare(0, scheme, "tcp") != 0) return interface;
  return "tcp://" + disambiguate_ip_address(interface.substr(scheme + 3), location);
}

}  // namespace pxf::conn

#include <cerrno>
#include <cstring>
#include <poll.h>

namespace pxf::conn {

std::pair<std::string, int> split_tcp_url(const std::string& url) {
  auto scheme = url.find("://");
  std::string rest = scheme == std::string::npos ? url : url.substr(scheme + 3);
  auto colon = rest.rfind(':');
  if (colon == std::string::npos) return {rest, 0};
  int port = std::atoi(rest.c_str() + colon + 1);
  return {rest.substr(0, colon), port};
}

std::string tcp_probe(const std::string& host, int port, int timeout_ms) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  std::string service = std::to_string(port);
  if (int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &res); rc != 0 || !res)
    return "cannot resolve '" + host + "' (" + gai_strerror(rc) + ")";
  std::string why;
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    freeaddrinfo(res);
    return std::string("cannot create a socket: ") + std::strerror(errno);
  }
  int err = 0;
  if (::connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
    err = errno;
    if (err == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      int n = ::poll(&p, 1, timeout_ms);
      if (n == 0) {
        err = ETIMEDOUT;
      } else {
        socklen_t len = sizeof err;
        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      }
    }
  }
  ::close(fd);
  freeaddrinfo(res);
  const std::string where = host + ":" + service;
  switch (err) {
  case 0: return "";
  case ECONNREFUSED: return "connection refused at " + where + " (nothing listens there)";
  case ETIMEDOUT:
    return "no answer from " + where + " within " + std::to_string(timeout_ms / 1000.0).substr(0, 3) +
           " s (a firewall drops the packets, or the host is down)";
  case EHOSTUNREACH: return "no route to host " + host;
  case ENETUNREACH: return "network unreachable for " + host;
  case EACCES:
  case EPERM: return "connections to " + where + " are prohibited here (a firewall rule or a prohibit route)";
  case EINVAL: return "no usable route to " + host + " (a blackhole route?)";
  default: return "cannot connect to " + where + ": " + std::strerror(err);
  }
}

}  // namespace pxf::conn
