// Profile-dir resolution with the stock precedence, file names, and profile folder creation.
#include "conn/profile.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <map>

namespace {

using namespace pxf::conn;

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "pxf-profile-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = fs::canonical(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

mode_t mode_of(const fs::path& p) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) throw std::runtime_error("stat failed: " + p.string());
  return st.st_mode & 07777;
}

// Every variable the resolver reads starts unset, and each test's changes are undone, so tests
// do not depend on the environment they run in nor leak into each other.
class Profile : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : {"IPYTHONDIR", "IPYTHON_DIR", "HOME", "XDG_CONFIG_HOME", "IPP_PROFILE_DIR",
                             "IPP_CLUSTER_ID", "PXF_TEST_VAR"}) {
      if (const char* v = std::getenv(name)) saved_[name] = v;
      else saved_[name] = std::nullopt;
      ::unsetenv(name);
    }
    cwd_ = fs::current_path();
    set("HOME", (tmp_.path() / "home").string());
    set("IPYTHONDIR", (tmp_.path() / "ipd").string());
  }
  void TearDown() override {
    fs::current_path(cwd_);
    for (const auto& [name, value] : saved_) {
      if (value) ::setenv(name.c_str(), value->c_str(), 1);
      else ::unsetenv(name.c_str());
    }
  }
  static void set(const char* name, const std::string& value) { ::setenv(name, value.c_str(), 1); }
  static void unset(const char* name) { ::unsetenv(name); }

  TempDir tmp_;

 private:
  std::map<std::string, std::optional<std::string>> saved_;
  fs::path cwd_;
};

TEST_F(Profile, DefaultProfileUnderIpythonDir) {
  const ProfileLocation loc = resolve_profile({});
  EXPECT_EQ(loc.profile_dir, tmp_.path() / "ipd" / "profile_default");
  EXPECT_EQ(loc.cluster_id, "");
  EXPECT_EQ(loc.client_file(), tmp_.path() / "ipd/profile_default/security/ipcontroller-client.json");
  EXPECT_EQ(loc.engine_file(), tmp_.path() / "ipd/profile_default/security/ipcontroller-engine.json");
  EXPECT_EQ(loc.log_dir(), tmp_.path() / "ipd/profile_default/log");
}

TEST_F(Profile, ProfileNameSelectsProfileFolder) {
  EXPECT_EQ(resolve_profile({.profile = "mpi"}).profile_dir, tmp_.path() / "ipd" / "profile_mpi");
}

TEST_F(Profile, ProfileDirBeatsEverything) {
  set("IPP_PROFILE_DIR", (tmp_.path() / "from-env").string());
  const ProfileLocation loc =
      resolve_profile({.profile = "mpi", .profile_dir = tmp_.path() / "from-cli", .ipython_dir = tmp_.path() / "x"});
  EXPECT_EQ(loc.profile_dir, tmp_.path() / "from-cli");
}

TEST_F(Profile, EnvironmentProfileDirBeatsProfileNameAsInStock8) {
  set("IPP_PROFILE_DIR", (tmp_.path() / "from-env").string());
  EXPECT_EQ(resolve_profile({.profile = "mpi"}).profile_dir, tmp_.path() / "from-env");
  EXPECT_EQ(resolve_profile({}).profile_dir, tmp_.path() / "from-env");
}

TEST_F(Profile, EmptyEnvironmentProfileDirCountsAsUnset) {
  set("IPP_PROFILE_DIR", "");
  EXPECT_EQ(resolve_profile({.profile = "mpi"}).profile_dir, tmp_.path() / "ipd" / "profile_mpi");
  EXPECT_EQ(resolve_profile({.profile_dir = fs::path()}).profile_dir, tmp_.path() / "ipd" / "profile_default");
}

TEST_F(Profile, IpythonDirOptionBeatsEnvironment) {
  EXPECT_EQ(resolve_profile({.profile = "a", .ipython_dir = tmp_.path() / "other"}).profile_dir,
            tmp_.path() / "other" / "profile_a");
}

TEST_F(Profile, ClusterIdPrecedence) {
  EXPECT_EQ(resolve_profile({.cluster_id = "cli"}).cluster_id, "cli");
  set("IPP_CLUSTER_ID", "env");
  EXPECT_EQ(resolve_profile({}).cluster_id, "env");
  EXPECT_EQ(resolve_profile({.cluster_id = "cli"}).cluster_id, "cli");
  // --cluster-id="" on the stock command line overrides the variable too.
  EXPECT_EQ(resolve_profile({.cluster_id = ""}).cluster_id, "");
  const ProfileLocation loc = resolve_profile({.profile_dir = tmp_.path() / "p"});
  EXPECT_EQ(loc.client_file(), tmp_.path() / "p/security/ipcontroller-env-client.json");
  EXPECT_EQ(loc.engine_file(), tmp_.path() / "p/security/ipcontroller-env-engine.json");
}

TEST_F(Profile, PathsAreExpandedAndAbsolute) {
  set("PXF_TEST_VAR", "expanded");
  EXPECT_EQ(resolve_profile({.profile_dir = "~/p/$PXF_TEST_VAR/${PXF_TEST_VAR}x/$NOT_SET_PXF/"}).profile_dir,
            tmp_.path() / "home/p/expanded/expandedx/$NOT_SET_PXF");
  set("IPP_PROFILE_DIR", "~/e");
  EXPECT_EQ(resolve_profile({}).profile_dir, tmp_.path() / "home/e");
  fs::current_path(tmp_.path());
  EXPECT_EQ(resolve_profile({.profile_dir = "rel/./p/../q"}).profile_dir, tmp_.path() / "rel/q");
}

TEST_F(Profile, IpythonDirFromEnvironment) {
  EXPECT_EQ(ipython_dir(), tmp_.path() / "ipd");
  set("IPYTHONDIR", "~/custom/");
  EXPECT_EQ(ipython_dir(), tmp_.path() / "home/custom");
  unset("IPYTHONDIR");
  set("IPYTHON_DIR", (tmp_.path() / "old").string());  // deprecated, still honoured
  EXPECT_EQ(ipython_dir(), tmp_.path() / "old");
}

TEST_F(Profile, IpythonDirDefaultsToHomeDotIpython) {
  unset("IPYTHONDIR");
  EXPECT_EQ(ipython_dir(), tmp_.path() / "home" / ".ipython");
  EXPECT_EQ(resolve_profile({.profile = "x"}).profile_dir, tmp_.path() / "home/.ipython/profile_x");
}

TEST_F(Profile, LegacyXdgIpythonDirOnlyWithoutDotIpython) {
  unset("IPYTHONDIR");
  const fs::path home = tmp_.path() / "home";
  fs::create_directories(home / ".config" / "ipython");
  EXPECT_EQ(ipython_dir(), home / ".config" / "ipython");
  set("XDG_CONFIG_HOME", (tmp_.path() / "xdg").string());  // no ipython folder there
  EXPECT_EQ(ipython_dir(), home / ".ipython");
  unset("XDG_CONFIG_HOME");
  fs::create_directories(home / ".ipython");
  EXPECT_EQ(ipython_dir(), home / ".ipython");
}

TEST(ConnectionFileName, WithAndWithoutClusterId) {
  EXPECT_EQ(connection_file_name("", "client"), "ipcontroller-client.json");
  EXPECT_EQ(connection_file_name("", "engine"), "ipcontroller-engine.json");
  EXPECT_EQ(connection_file_name("1647026890-u1vi", "engine"), "ipcontroller-1647026890-u1vi-engine.json");
  EXPECT_THROW(connection_file_name("", "hub"), std::invalid_argument);
}

TEST_F(Profile, EnsureProfileDirsCreatesPrivateSecurityFolder) {
  const mode_t old = ::umask(0);
  const ProfileLocation loc = resolve_profile({.profile_dir = tmp_.path() / "a" / "profile_x"});
  ensure_profile_dirs(loc);
  ::umask(old);
  EXPECT_TRUE(fs::is_directory(loc.log_dir()));
  EXPECT_EQ(mode_of(loc.security_dir()), 0700u);
  ensure_profile_dirs(loc);  // idempotent
}

TEST_F(Profile, EnsureProfileDirsTightensExistingSecurityFolder) {
  const ProfileLocation loc = resolve_profile({.profile_dir = tmp_.path() / "p"});
  fs::create_directories(loc.security_dir());
  fs::permissions(loc.security_dir(), fs::perms::all);
  ensure_profile_dirs(loc);
  EXPECT_EQ(mode_of(loc.security_dir()), 0700u);
}

TEST_F(Profile, EnsureProfileDirsReportsAFileInTheWay) {
  const ProfileLocation loc = resolve_profile({.profile_dir = tmp_.path() / "p"});
  fs::create_directories(loc.profile_dir);
  { std::ofstream(loc.security_dir()) << "x"; }
  try {
    ensure_profile_dirs(loc);
    ADD_FAILURE() << "no error";
  } catch (const ConnectionFileError& e) {
    EXPECT_NE(std::string(e.what()).find(loc.security_dir().string()), std::string::npos) << e.what();
  }
}

}  // namespace
