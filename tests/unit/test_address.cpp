// ipyparallel's disambiguate_ip_address rules (conn/address.hpp) and the reachability probe.
#include "conn/address.hpp"

#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

using namespace pxf::conn;

namespace {
std::string host_name() {
  char buf[256] = {};
  gethostname(buf, sizeof buf - 1);
  return buf;
}
}  // namespace

TEST(Address, ExplicitAddressesAreKept) {
  EXPECT_EQ(disambiguate_ip_address("10.1.2.3", "elsewhere"), "10.1.2.3");
  EXPECT_EQ(disambiguate_ip_address("127.0.0.1", ""), "127.0.0.1");
}

TEST(Address, WildcardWithoutLocationIsLocalhost) {
  EXPECT_EQ(disambiguate_ip_address("*", ""), "127.0.0.1");
  EXPECT_EQ(disambiguate_ip_address("0.0.0.0", ""), "127.0.0.1");
}

TEST(Address, WildcardAtThisHostIsLocalhost) {
  EXPECT_EQ(disambiguate_ip_address("*", host_name()), "127.0.0.1");
  for (const auto& ip : local_ips()) {
    if (ip.find(':') == std::string::npos && ip.rfind("127.", 0) != 0) {
      EXPECT_EQ(disambiguate_ip_address("*", ip), "127.0.0.1") << ip;
    }
  }
}

TEST(Address, WildcardElsewhereIsTheLocation) {
  // 192.0.2.0/24 is TEST-NET-1: never one of this machine's addresses.
  EXPECT_EQ(disambiguate_ip_address("*", "192.0.2.7"), "192.0.2.7");
  EXPECT_EQ(disambiguate_ip_address("*", "localhost"), "127.0.0.1");
  // A name that does not resolve is dialled as given (stock: with a warning).
  EXPECT_EQ(disambiguate_ip_address("*", "no-such-host.invalid"), "no-such-host.invalid");
}

TEST(Address, Urls) {
  EXPECT_EQ(disambiguate_url("tcp://*:5555", "192.0.2.7"), "tcp://192.0.2.7:5555");
  EXPECT_EQ(disambiguate_url("tcp://10.0.0.1:5555", "192.0.2.7"), "tcp://10.0.0.1:5555");
  EXPECT_EQ(disambiguate_url("ipc:///tmp/x", "192.0.2.7"), "ipc:///tmp/x");
  EXPECT_EQ(disambiguate_interface("tcp://0.0.0.0", ""), "tcp://127.0.0.1");
  EXPECT_EQ(disambiguate_interface("tcp://*", "192.0.2.7"), "tcp://192.0.2.7");
  auto [h, p] = split_tcp_url("tcp://10.0.0.1:5555");
  EXPECT_EQ(h, "10.0.0.1");
  EXPECT_EQ(p, 5555);
}

TEST(Address, ProbeSaysRefusedWhenNothingListens) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  int port = ntohs(a.sin_port);
  EXPECT_NE(tcp_probe("127.0.0.1", port, 1000).find("connection refused"), std::string::npos);  // bound, not listening
  ASSERT_EQ(::listen(fd, 1), 0);
  EXPECT_EQ(tcp_probe("127.0.0.1", port, 1000), "");
  ::close(fd);
  EXPECT_NE(tcp_probe("no-such-host.invalid", 1, 1000).find("cannot resolve"), std::string::npos);
}
