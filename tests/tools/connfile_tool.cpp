// Drives the C++ connection-file reader/writer and profile resolution from Python tests.
//
//   connfile_tool read-client PATH | read-engine PATH   parse, print the info in file format
//   connfile_tool read-engine-env                       same, from $IPP_CONNECTION_INFO
//   connfile_tool write-client PATH | write-engine PATH JSON on stdin -> validated atomic write
//   connfile_tool resolve [OPTIONS]                     print the resolved locations as JSON
//   connfile_tool ensure-dirs [OPTIONS]                 resolve, create the folders, print
//   connfile_tool url INTERFACE PORT
// OPTIONS: --profile NAME, --profile-dir DIR, --cluster-id ID, --ipython-dir DIR (also --opt=value).
// Exit status: 0 ok, 2 ConnectionFileError (message on stderr), 64 usage error.
#include "conn/connection_file.hpp"
#include "conn/profile.hpp"

#include <cstdlib>
#include <iostream>
#include <iterator>
#include <span>
#include <string>

namespace {

using namespace pxf::conn;

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "connfile_tool: " << why << " (see the comment at the top of connfile_tool.cpp)\n";
  std::exit(64);
}

ProfileRequest parse_options(std::span<char*> args) {
  ProfileRequest req;
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string arg = args[i], value;
    if (auto eq = arg.find('='); eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg.resize(eq);
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      usage("missing value for " + arg);
    }
    if (arg == "--profile") req.profile = value;
    else if (arg == "--profile-dir") req.profile_dir = value;
    else if (arg == "--cluster-id") req.cluster_id = value;
    else if (arg == "--ipython-dir") req.ipython_dir = value;
    else usage("unknown option " + arg);
  }
  return req;
}

void print_location(const ProfileLocation& loc) {
  ordered_json j;
  j["profile_dir"] = loc.profile_dir.string();
  j["cluster_id"] = loc.cluster_id;
  j["security_dir"] = loc.security_dir().string();
  j["client_file"] = loc.client_file().string();
  j["engine_file"] = loc.engine_file().string();
  std::cout << j.dump() << "\n";
}

json read_stdin_json() {
  const std::string text{std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>()};
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    usage(std::string("stdin is not JSON: ") + e.what());
  }
}

int run(std::span<char*> argv) {
  if (argv.size() < 2) usage("missing command");
  const std::string cmd = argv[1];
  const auto rest = argv.subspan(2);
  auto one_path = [&]() -> std::string {
    if (rest.size() != 1) usage(cmd + " takes exactly one PATH");
    return rest[0];
  };
  if (cmd == "read-client") {
    std::cout << to_file_text(to_json(read_client_file(one_path()))) << "\n";
  } else if (cmd == "read-engine") {
    std::cout << to_file_text(to_json(read_engine_file(one_path()))) << "\n";
  } else if (cmd == "read-engine-env") {
    const char* text = std::getenv("IPP_CONNECTION_INFO");
    if (text == nullptr) usage("IPP_CONNECTION_INFO is not set");
    std::cout << to_file_text(to_json(engine_from_text(text, "IPP_CONNECTION_INFO"))) << "\n";
  } else if (cmd == "write-client") {
    const std::string path = one_path();
    write_client_file(path, client_from_json(read_stdin_json(), "stdin"));
  } else if (cmd == "write-engine") {
    const std::string path = one_path();
    write_engine_file(path, engine_from_json(read_stdin_json(), "stdin"));
  } else if (cmd == "resolve") {
    print_location(resolve_profile(parse_options(rest)));
  } else if (cmd == "ensure-dirs") {
    const ProfileLocation loc = resolve_profile(parse_options(rest));
    ensure_profile_dirs(loc);
    print_location(loc);
  } else if (cmd == "url") {
    if (rest.size() != 2) usage("url takes INTERFACE PORT");
    std::cout << url(rest[0], std::stoi(rest[1])) << "\n";
  } else {
    usage("unknown command " + cmd);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(std::span<char*>(argv, static_cast<std::size_t>(argc)));
  } catch (const ConnectionFileError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}
