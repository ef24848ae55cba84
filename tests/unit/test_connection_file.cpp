// Connection files: stock format, atomic 0600 writes, and an actionable error for every bad file.
#include "conn/connection_file.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

namespace {

using namespace pxf::conn;

// gtest-only (no gmock): substring check that prints the whole message on failure.
#define EXPECT_CONTAINS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << "message: " << (text)
#define ASSERT_CONTAINS(text, part) ASSERT_NE(std::string(text).find(part), std::string::npos) << "message: " << (text)

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "pxf-conn-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

ClientInfo sample_client() {
  ClientInfo c;
  c.location = "vm";
  c.key = "cb302131-717f8cc87330883f350a7366";
  c.registration = 46103;
  c.control = 47819;
  c.mux = 58059;
  c.task = 36499;
  c.iopub = 49139;
  c.notification = 34267;
  c.broadcast = 45507;
  return c;
}

EngineInfo sample_engine() {
  EngineInfo e;
  e.location = "vm";
  e.key = "cb302131-717f8cc87330883f350a7366";
  e.registration = 46103;
  e.control = 36721;
  e.mux = 52493;
  e.task = 49453;
  e.iopub = 53193;
  e.hb_ping = 38345;
  e.hb_pong = 40895;
  e.broadcast = {53949, 43921};
  return e;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void spit(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

mode_t mode_of(const fs::path& p) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) throw std::runtime_error("stat failed: " + p.string());
  return st.st_mode & 07777;
}

// Runs `fn`, expects ConnectionFileError, returns its message.
template <class F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const ConnectionFileError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no ConnectionFileError thrown";
  return "";
}

// Writes `j` as a client/engine file and returns the reader's error message.
std::string client_error(const TempDir& d, const json& j) {
  const fs::path p = d.path() / "ipcontroller-client.json";
  spit(p, j.dump());
  return error_of([&] { read_client_file(p); });
}

std::string engine_error(const TempDir& d, const json& j) {
  const fs::path p = d.path() / "ipcontroller-engine.json";
  spit(p, j.dump());
  return error_of([&] { read_engine_file(p); });
}

// ---------------------------------------------------------------- format

TEST(ConnectionFileFormat, ClientTextIsByteForByteWhatStockWrites) {
  // Layout of a file written by stock ipcontroller 7.1 (json.dumps(indent=2), no final newline).
  const std::string expected = R"({
  "ssh": "",
  "interface": "tcp://127.0.0.1",
  "registration": 46103,
  "control": 47819,
  "mux": 58059,
  "task": 36499,
  "task_scheme": "leastload",
  "iopub": 49139,
  "notification": 34267,
  "broadcast": 45507,
  "key": "cb302131-717f8cc87330883f350a7366",
  "curve_serverkey": null,
  "location": "vm",
  "pack": "json",
  "unpack": "json",
  "signature_scheme": "hmac-sha256"
})";
  EXPECT_EQ(to_file_text(to_json(sample_client())), expected);
}

TEST(ConnectionFileFormat, EngineTextIsByteForByteWhatStockWrites) {
  const std::string expected = R"({
  "ssh": "",
  "interface": "tcp://127.0.0.1",
  "registration": 46103,
  "control": 36721,
  "mux": 52493,
  "task": 49453,
  "iopub": 53193,
  "hb_ping": 38345,
  "hb_pong": 40895,
  "broadcast": [
    53949,
    43921
  ],
  "key": "cb302131-717f8cc87330883f350a7366",
  "curve_serverkey": null,
  "location": "vm",
  "pack": "json",
  "unpack": "json",
  "signature_scheme": "hmac-sha256"
})";
  EXPECT_EQ(to_file_text(to_json(sample_engine())), expected);
}

TEST(ConnectionFileFormat, PortsAreIntegersAndCurveKeyIsStringWhenSet) {
  EngineInfo e = sample_engine();
  e.curve_serverkey = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";
  const auto j = to_json(e);
  EXPECT_TRUE(j["control"].is_number_integer());
  EXPECT_TRUE(j["broadcast"].is_array());
  EXPECT_EQ(j["curve_serverkey"], e.curve_serverkey.value());
  EXPECT_TRUE(to_json(sample_client())["broadcast"].is_number_integer());
}

TEST(ConnectionFileFormat, NonAsciiIsEscapedLikePython) {
  ClientInfo c = sample_client();
  c.location = "h\xc3\xb4te\x7f";  // "hôte" + DEL: Python's ensure_ascii escapes both
  EXPECT_CONTAINS(to_file_text(to_json(c)), R"("location": "h\u00f4te\u007f")");
}

TEST(ConnectionFileFormat, Url) {
  EXPECT_EQ(url("tcp://127.0.0.1", 5555), "tcp://127.0.0.1:5555");
  EXPECT_EQ(url("tcp://10.0.0.7", 1), "tcp://10.0.0.7:1");
}

// ---------------------------------------------------------------- round trips

TEST(ConnectionFileRoundTrip, Client) {
  TempDir d;
  ClientInfo c = sample_client();
  c.ssh = "user@login";
  c.task_scheme = "pure";
  c.curve_serverkey = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN";
  c.signature_scheme = "hmac-sha512";
  c.pack = c.unpack = "pickle";
  const fs::path p = d.path() / "security" / "ipcontroller-client.json";
  write_client_file(p, c);
  EXPECT_EQ(read_client_file(p), c);
}

TEST(ConnectionFileRoundTrip, Engine) {
  TempDir d;
  EngineInfo e = sample_engine();
  e.broadcast = {1000, 1001, 1002, 1003};
  e.key = "";
  const fs::path p = d.path() / "ipcontroller-x-engine.json";
  write_engine_file(p, e);
  EXPECT_EQ(read_engine_file(p), e);
}

TEST(ConnectionFileRoundTrip, EngineFromEnvironmentText) {
  const EngineInfo e = sample_engine();
  EXPECT_EQ(engine_from_text(to_json(e).dump(), "IPP_CONNECTION_INFO"), e);
}

TEST(ConnectionFileRoundTrip, UnknownKeysAreIgnored) {
  json j = to_json(sample_client());
  j["future_key"] = {1, 2, 3};
  EXPECT_EQ(client_from_json(j, "x"), sample_client());
}

TEST(ConnectionFileRoundTrip, OptionalKeysDefaultLikeTheStockConsumers) {
  json c = to_json(sample_client());
  c.erase("ssh");
  c.erase("location");
  c.erase("curve_serverkey");
  const ClientInfo ci = client_from_json(c, "x");
  EXPECT_EQ(ci.ssh, "");
  EXPECT_EQ(ci.location, "");
  EXPECT_FALSE(ci.curve_serverkey);

  json e = to_json(sample_engine());
  e.erase("key");  // the stock engine uses d.get('key', '')
  e["ssh"] = nullptr;
  e["curve_serverkey"] = "";  // "" is falsy in stock: CURVE off
  const EngineInfo ei = engine_from_json(e, "x");
  EXPECT_EQ(ei.key, "");
  EXPECT_EQ(ei.ssh, "");
  EXPECT_FALSE(ei.curve_serverkey);
}

// ---------------------------------------------------------------- atomic writes

TEST(ConnectionFileWrite, Mode0600AndNewFoldersMode0700EvenWithPermissiveUmask) {
  TempDir d;
  const mode_t old = ::umask(0);
  const fs::path p = d.path() / "profile" / "security" / "ipcontroller-client.json";
  write_client_file(p, sample_client());
  ::umask(old);
  EXPECT_EQ(mode_of(p), 0600u);
  EXPECT_EQ(mode_of(p.parent_path()), 0700u);
  EXPECT_EQ(mode_of(p.parent_path().parent_path()), 0700u);
}

TEST(ConnectionFileWrite, ReplacesExistingFileWithMode0600AndLeavesNoTemporaryFile) {
  TempDir d;
  const fs::path p = d.path() / "ipcontroller-engine.json";
  spit(p, "old");
  fs::permissions(p, fs::perms::all);
  write_engine_file(p, sample_engine());
  EXPECT_EQ(mode_of(p), 0600u);
  EXPECT_EQ(read_engine_file(p), sample_engine());
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(d.path())) names.push_back(entry.path().filename());
  EXPECT_EQ(names, std::vector<std::string>{"ipcontroller-engine.json"});
}

TEST(ConnectionFileWrite, ReadersNeverSeeAHalfWrittenFile) {
  TempDir d;
  const fs::path p = d.path() / "ipcontroller-client.json";
  ClientInfo small = sample_client();
  ClientInfo big = sample_client();
  big.location = std::string(100000, 'x');  // many write() calls' worth, if it were in place
  write_client_file(p, small);

  std::atomic<bool> stop{false};
  std::atomic<int> reads{0}, bad{0};
  std::string first_bad;
  std::thread reader([&] {
    while (!stop) {
      try {
        const ClientInfo got = read_client_file(p);
        if (!(got == small) && !(got == big)) ++bad;
      } catch (const ConnectionFileError& e) {
        if (bad++ == 0) first_bad = e.what();
      }
      ++reads;
    }
  });
  for (int i = 0; i < 200; ++i) write_client_file(p, i % 2 ? small : big);
  while (reads < 200) std::this_thread::yield();
  stop = true;
  reader.join();
  EXPECT_EQ(bad, 0) << first_bad;
}

TEST(ConnectionFileWrite, FailedRenameKeepsTheTargetAndRemovesTheTemporaryFile) {
  TempDir d;
  const fs::path p = d.path() / "ipcontroller-client.json";
  fs::create_directory(p);  // rename(file, directory) fails
  spit(p / "keep", "x");
  const std::string msg = error_of([&] { write_client_file(p, sample_client()); });
  EXPECT_CONTAINS(msg, p.string());
  EXPECT_CONTAINS(msg, "cannot rename");
  EXPECT_EQ(slurp(p / "keep"), "x");
  int entries = 0;
  for ([[maybe_unused]] const auto& entry : fs::directory_iterator(d.path())) ++entries;
  EXPECT_EQ(entries, 1);
}

TEST(ConnectionFileWrite, RefusesInvalidInfoAndTouchesNothing) {
  TempDir d;
  const fs::path p = d.path() / "ipcontroller-engine.json";
  write_engine_file(p, sample_engine());
  const std::string before = slurp(p);

  EngineInfo bad = sample_engine();
  bad.hb_pong = 0;
  std::string msg = error_of([&] { write_engine_file(p, bad); });
  EXPECT_CONTAINS(msg, "refusing to write " + p.string());
  EXPECT_CONTAINS(msg, "'hb_pong' = 0 is not a TCP port");

  bad = sample_engine();
  bad.broadcast.clear();
  EXPECT_CONTAINS(error_of([&] { write_engine_file(p, bad); }), "empty list");

  bad = sample_engine();
  bad.location = "\xff\xfe";  // not UTF-8: cannot be JSON
  EXPECT_CONTAINS(error_of([&] { write_engine_file(p, bad); }), "cannot serialize");
  EXPECT_EQ(slurp(p), before);
}

TEST(ConnectionFileWrite, ParentThatIsAFileIsReported) {
  TempDir d;
  spit(d.path() / "security", "not a folder");
  const std::string msg =
      error_of([&] { write_client_file(d.path() / "security" / "ipcontroller-client.json", sample_client()); });
  EXPECT_CONTAINS(msg, "exists but is not a folder");
}

// ---------------------------------------------------------------- unreadable files

TEST(ConnectionFileRead, MissingFile) {
  TempDir d;
  const fs::path p = d.path() / "ipcontroller-client.json";
  const std::string msg = error_of([&] { read_client_file(p); });
  EXPECT_CONTAINS(msg, p.string() + ": no such file");
  EXPECT_CONTAINS(msg, "is the controller running?");
}

TEST(ConnectionFileRead, PermissionDenied) {
  TempDir d;
  fs::permissions(d.path(), fs::perms::owner_all | fs::perms::others_exec);
  const fs::path p = d.path() / "ipcontroller-client.json";
  write_client_file(p, sample_client());
  if (::geteuid() != 0) {
    fs::permissions(p, fs::perms::none);
    EXPECT_CONTAINS(error_of([&] { read_client_file(p); }), "user who started the controller");
    return;
  }
  // Root reads anything: read as "nobody" in a child, which sees the file's real 0600 mode.
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(pipefd[0]);
    std::string msg = "no error";
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) msg = "setuid failed";
    else msg = error_of([&] { read_client_file(p); });
    [[maybe_unused]] auto n = ::write(pipefd[1], msg.data(), msg.size());
    ::_exit(0);
  }
  ::close(pipefd[1]);
  std::string msg;
  char buf[512];
  for (ssize_t n; (n = ::read(pipefd[0], buf, sizeof buf)) > 0;) msg.append(buf, static_cast<std::size_t>(n));
  ::close(pipefd[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_CONTAINS(msg, p.string() + ": cannot open: Permission denied");
  EXPECT_CONTAINS(msg, "user who started the controller");
}

TEST(ConnectionFileRead, FolderFifoAndHugeFile) {
  TempDir d;
  EXPECT_CONTAINS(error_of([&] { read_engine_file(d.path()); }), "is a folder");

  const fs::path fifo = d.path() / "fifo.json";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  // Must fail at once rather than block waiting for a writer.
  EXPECT_CONTAINS(error_of([&] { read_engine_file(fifo); }), "not a regular file");

  const fs::path huge = d.path() / "huge.json";
  spit(huge, std::string(2 << 20, ' '));
  EXPECT_CONTAINS(error_of([&] { read_engine_file(huge); }), "too large");
}

TEST(ConnectionFileRead, EmptyFile) {
  TempDir d;
  const fs::path p = d.path() / "ipcontroller-client.json";
  spit(p, "\n");
  const std::string msg = error_of([&] { read_client_file(p); });
  EXPECT_CONTAINS(msg, p.string() + ": empty file");
  EXPECT_CONTAINS(msg, "restart");
}

TEST(ConnectionFileRead, TruncatedFileAtEveryLength) {
  TempDir d;
  const fs::path p = d.path() / "ipcontroller-engine.json";
  const std::string full = to_file_text(to_json(sample_engine()));
  // Every proper prefix that still has a non-blank character is a "truncated" error.
  for (std::size_t n = 1; n < full.size(); ++n) {
    spit(p, full.substr(0, n));
    const std::string msg = error_of([&] { read_engine_file(p); });
    ASSERT_CONTAINS(msg, p.string() + ": truncated JSON") << "prefix length " << n;
  }
}

TEST(ConnectionFileRead, NotJson) {
  TempDir d;
  const fs::path p = d.path() / "ipcontroller-client.json";
  spit(p, "ssh = ''\ninterface = tcp://127.0.0.1\n");
  std::string msg = error_of([&] { read_client_file(p); });
  EXPECT_CONTAINS(msg, p.string() + ": not valid JSON");
  EXPECT_CONTAINS(msg, "line 1");

  spit(p, "{\"ssh\": \"\xff\"}");
  EXPECT_CONTAINS(error_of([&] { read_client_file(p); }), "not valid JSON");
}

TEST(ConnectionFileRead, NotAnObject) {
  TempDir d;
  const std::string msg = client_error(d, json::array({1, 2}));
  EXPECT_CONTAINS(msg, "expected a JSON object");
  EXPECT_CONTAINS(msg, "got array");
  EXPECT_CONTAINS(engine_error(d, "tcp://127.0.0.1:5555"), "got string");
}

// ---------------------------------------------------------------- missing / wrong keys

TEST(ConnectionFileKeys, EveryRequiredClientKey) {
  TempDir d;
  for (const char* key : {"interface", "registration", "control", "mux", "task", "task_scheme", "iopub", "notification",
                          "broadcast", "key", "pack", "unpack", "signature_scheme"}) {
    json j = to_json(sample_client());
    j.erase(key);
    const std::string msg = client_error(d, j);
    EXPECT_CONTAINS(msg, ": missing key '" + std::string(key) + "'") << key;
    EXPECT_CONTAINS(msg, "ipyparallel < 7.0") << key;
    EXPECT_CONTAINS(msg, "ipcontroller-client.json") << key;
  }
}

TEST(ConnectionFileKeys, EveryRequiredEngineKey) {
  TempDir d;
  for (const char* key : {"interface", "registration", "control", "mux", "task", "iopub", "hb_ping", "hb_pong",
                          "broadcast", "pack", "unpack", "signature_scheme"}) {
    json j = to_json(sample_engine());
    j.erase(key);
    EXPECT_CONTAINS(engine_error(d, j), ": missing key '" + std::string(key) + "'") << key;
  }
}

TEST(ConnectionFileKeys, StringPortSaysHowToWriteIt) {
  TempDir d;
  json j = to_json(sample_client());
  j["control"] = "47819";
  const std::string msg = client_error(d, j);
  EXPECT_CONTAINS(msg, "key 'control' must be an integer port, got the string \"47819\"");
  EXPECT_CONTAINS(msg, "\"control\": 5555");
}

TEST(ConnectionFileKeys, OtherBadPorts) {
  TempDir d;
  const std::pair<json, std::string> cases[] = {
      {5555.5, "non-integer number 5555.5"},
      {5555.0, "non-integer number"},  // Python would format "5555.0" into the URL
      {true, "boolean true"},
      {nullptr, "null"},
      {0, "'mux' = 0 is not a TCP port"},
      {-1, "'mux' = -1 is not a TCP port"},
      {70000, "'mux' = 70000 is not a TCP port (1-65535)"},
      {json(18446744073709551615ull), "is not a TCP port"},
  };
  for (const auto& [value, expected] : cases) {
    json j = to_json(sample_engine());
    j["mux"] = value;
    EXPECT_CONTAINS(engine_error(d, j), expected) << value.dump();
  }
}

TEST(ConnectionFileKeys, BroadcastShapeDiffersBetweenTheFiles) {
  TempDir d;
  json e = to_json(sample_engine());
  e["broadcast"] = 53949;
  std::string msg = engine_error(d, e);
  EXPECT_CONTAINS(msg, "key 'broadcast' must be a list of ports in the engine file");
  EXPECT_CONTAINS(msg, "got number 53949");

  e["broadcast"] = json::array();
  EXPECT_CONTAINS(engine_error(d, e), "'broadcast' is an empty list");

  e["broadcast"] = {53949, "43921"};
  EXPECT_CONTAINS(engine_error(d, e), "key 'broadcast[1]' must be an integer port");

  json c = to_json(sample_client());
  c["broadcast"] = {1, 2};
  msg = client_error(d, c);
  EXPECT_CONTAINS(msg, "key 'broadcast' must be one integer port in the client file");
  EXPECT_CONTAINS(msg, "engine file's format");
}

TEST(ConnectionFileKeys, WrongStringTypesAndValues) {
  TempDir d;
  json j = to_json(sample_client());
  j["key"] = 12345;
  EXPECT_CONTAINS(client_error(d, j), "key 'key' must be a string, got number 12345");

  j = to_json(sample_client());
  j["interface"] = "127.0.0.1";
  EXPECT_CONTAINS(client_error(d, j), "key 'interface' = \"127.0.0.1\" must look like \"tcp://127.0.0.1\"");

  j = to_json(sample_client());
  j["signature_scheme"] = "sha256";
  EXPECT_CONTAINS(client_error(d, j), "use \"hmac-<hash>\"");

  j = to_json(sample_client());
  j["location"] = json::array();
  EXPECT_CONTAINS(client_error(d, j), "key 'location' must be a string, got array");

  json e = to_json(sample_engine());
  e["curve_serverkey"] = 1;
  EXPECT_CONTAINS(engine_error(d, e), "key 'curve_serverkey' must be a string");
}

TEST(ConnectionFileKeys, SwappedFilesAreNamedAsSuch) {
  TempDir d;
  EXPECT_CONTAINS(client_error(d, to_json(sample_engine())),
                  "looks like an ipcontroller-engine.json file (it has 'hb_ping' but no 'notification'); "
                  "pass the ipcontroller-client.json file instead");
  EXPECT_CONTAINS(engine_error(d, to_json(sample_client())), "looks like an ipcontroller-client.json file");
}

TEST(ConnectionFileKeys, EnvironmentSourceIsNamed) {
  const std::string msg = error_of([] { engine_from_text("{\"ssh\": ", "IPP_CONNECTION_INFO"); });
  EXPECT_EQ(msg.rfind("IPP_CONNECTION_INFO: truncated JSON", 0), 0u) << msg;
}

}  // namespace
