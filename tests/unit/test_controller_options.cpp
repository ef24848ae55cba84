// pxcontroller's addresses and the profile's ipcontroller_config.py (controller/options.hpp).
#include "controller/options.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

using namespace pxf::controller;
namespace fs = std::filesystem;

namespace {
struct TempProfile {
  fs::path dir;
  TempProfile() {
    char tmpl[] = "/tmp/pxf-opts-XXXXXX";
    dir = mkdtemp(tmpl);
  }
  ~TempProfile() { fs::remove_all(dir); }
  void config(const std::string& text) { std::ofstream(dir / "ipcontroller_config.py") << text; }
  std::vector<std::string> args(std::vector<std::string> more = {}) {
    more.insert(more.begin(), "--profile-dir=" + dir.string());
    return more;
  }
};
}  // namespace

TEST(ControllerOptions, IpSetsBothSidesUnlessOneIsGiven) {
  auto o = parse_options({"--ip=*"});
  EXPECT_EQ(o->client_ip, "*");
  EXPECT_EQ(o->engine_ip, "*");
  o = parse_options({"--ip=10.0.0.1", "--client-ip=127.0.0.1"});
  EXPECT_EQ(o->client_ip, "127.0.0.1");
  EXPECT_EQ(o->engine_ip, "10.0.0.1");
  o = parse_options({"--IPController.engine_ip=*"});
  EXPECT_EQ(o->client_ip, "127.0.0.1");
  EXPECT_EQ(o->engine_ip, "*");
}

TEST(ControllerOptions, DeprecatedHubFactoryMeansIPController) {
  auto o = parse_options({"--HubFactory.client_ip=10.0.0.1", "--HubFactory.engine_ip='*'"});
  EXPECT_EQ(o->client_ip, "10.0.0.1");
  EXPECT_EQ(o->engine_ip, "*");
  EXPECT_TRUE(o->warnings.empty());
}

TEST(ControllerOptions, SshServersAndTransport) {
  auto o = parse_options({"--ssh=me@login:2222", "--enginessh", "gw", "--transport=tcp"});
  EXPECT_EQ(o->ssh_server, "me@login:2222");
  EXPECT_EQ(o->engine_ssh_server, "gw");
  EXPECT_THROW(parse_options({"--transport=ipc"}), UsageError);
  EXPECT_TRUE(parse_options({"--IPController.enable_curve=True"})->curve);
  EXPECT_TRUE(parse_options({"--curve"})->curve);
  EXPECT_FALSE(parse_options({"--IPController.enable_curve=False"})->curve);
  EXPECT_THROW(parse_options({"--IPController.curve_secretkey=short"}), UsageError);
}

TEST(ControllerOptions, ProfileConfigIsReadAndTheCommandLineWins) {
  TempProfile p;
  p.config("c = get_config()  # noqa\n"
           "c.HubFactory.client_ip = '10.0.0.1'\n"
           "c.IPController.engine_ip = \"*\"   # a comment\n"
           "c.IPController.location = u'login1'\n"
           "c.HeartMonitor.period = 500\n"
           "c.IPController.ports = [\n  40100,\n  40101,\n]\n"
           "c.TaskScheduler.scheme_name = 'lru'\n");
  auto o = parse_options(p.args());
  EXPECT_EQ(o->client_ip, "10.0.0.1");
  EXPECT_EQ(o->engine_ip, "*");
  EXPECT_EQ(o->location, "login1");
  EXPECT_EQ(o->ping_ms, 500);
  EXPECT_EQ(o->ports, (std::vector<int>{40100, 40101}));
  EXPECT_EQ(o->scheme, "lru");
  EXPECT_TRUE(o->warnings.empty()) << o->warnings.front();
  o = parse_options(p.args({"--ip=127.0.0.1", "--ping=250", "--scheme=twobin"}));
  EXPECT_EQ(o->ping_ms, 250);
  EXPECT_EQ(o->scheme, "twobin");
  // --ip on the command line sets both sides, but the file's explicit client/engine ip remain.
  EXPECT_EQ(o->client_ip, "10.0.0.1");
}

TEST(ControllerOptions, UnreadableConfigLinesAreNamedNotFatal) {
  TempProfile p;
  p.config("import os\nc.IPController.location = os.environ['X']\nfor i in []: pass\nc.Foo.bar = 1\n");
  auto o = parse_options(p.args());
  ASSERT_EQ(o->warnings.size(), 3u);
  EXPECT_NE(o->warnings[0].find("ipcontroller_config.py:2"), std::string::npos) << o->warnings[0];
  EXPECT_NE(o->warnings[1].find("ipcontroller_config.py:3"), std::string::npos) << o->warnings[1];
  EXPECT_NE(o->warnings[2].find("c.Foo.bar has no meaning"), std::string::npos) << o->warnings[2];
}

TEST(ControllerOptions, BadValueInConfigNamesTheFile) {
  TempProfile p;
  p.config("c.HeartMonitor.period = 'soon'\n");
  try {
    parse_options(p.args());
    FAIL() << "expected a UsageError";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("ipcontroller_config.py: c.HeartMonitor.period"), std::string::npos)
        << e.what();
  }
}
