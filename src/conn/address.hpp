#pragma once
// Which address to dial for a controller that listens on every interface: ipyparallel's
// disambiguate_ip_address / disambiguate_url rules (ipyparallel/util.py), used by every socket
// pxengine opens and by the tools that read connection files.
#include <string>
#include <utility>
#include <vector>

namespace pxf::conn {

// "*", "0.0.0.0" (and "" or "::") mean "every interface": a bind address, not one to dial.
bool is_wildcard(const std::string& ip);

// This machine's addresses (every interface, IPv4 and IPv6), from getifaddrs.
std::vector<std::string> local_ips();

// The first IPv4 address `host` resolves to, or "" if it resolves to none.
std::string ip_for_host(const std::string& host);

// The stock rules: an explicit address is returned unchanged. A wildcard becomes
//  * 127.0.0.1 when `location` is empty, this machine's hostname, or one of its own addresses;
//  * otherwise `location`'s address (or `location` itself if it does not resolve).
std::string disambiguate_ip_address(const std::string& ip, const std::string& location);

// "tcp://*:5555" -> "tcp://<disambiguated>:5555"; URLs that are not tcp://host:port are returned
// unchanged.
std::string disambiguate_url(const std::string& url, const std::string& location);

// "tcp://*" (a connection file's `interface`) -> "tcp://<disambiguated>".
std::string disambiguate_interface(const std::string& interface, const std::string& location);

}  // namespace pxf::conn

namespace pxf::conn {

// Whether a TCP connection to host:port can be made from here within timeout_ms. Returns ""
// when it can, else why not in words a user can act on ("connection refused: nothing listens
// on port P at H", "no route to host H", "no answer within 2 s: a firewall drops the packets
// or the host is down", "cannot resolve H").
std::string tcp_probe(const std::string& host, int port, int timeout_ms);

// "tcp://host:port" -> {host, port}; port 0 when the URL has none.
std::pair<std::string, int> split_tcp_url(const std::string& url);

}  // namespace pxf::conn
