#include "controller/options.hpp"

#include "util/log.hpp"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <fstream>
#include <charconv>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>

namespace pxf::controller {

namespace fs = std::filesystem;

std::string usage() {
  return R"(usage: pxcontroller [options]

A drop-in replacement for ipcontroller: serves the stock ipyparallel client and stock
ipengines, and the MPI engine jobs of pxfabric.

  --profile NAME          profile (files under $IPYTHONDIR/profile_NAME)
  --profile-dir DIR       profile directory (overrides --profile)
  --cluster-id ID         cluster id: ipcontroller-<ID>-{client,engine}.json
  --ip ADDR               address to listen on (default 127.0.0.1; '*' for all)
  --engine-ip ADDR        address for engine-facing sockets (default: --ip)
  --client-ip ADDR        address for client-facing sockets (default: --ip)
  --location HOST         the controller's host as others reach it, written into the
                          connection files (default: this host's name); engines and
                          clients dial it when the interface is '*'
  --curve                 CurveZMQ on every socket (IPController.enable_curve=True,
                          IPP_ENABLE_CURVE=1): encrypted and authenticated by the
                          controller's key, written as curve_serverkey in both files
  --ssh [USER@]HOST[:P]   SSH server clients tunnel through (`ssh` in the client file)
  --enginessh [USER@]HOST[:P]  SSH server engines tunnel through (engine file)
  --port N                registration port (default random)
  --ports A-B[,C...]      ports for the other sockets (default random)
  --reuse                 reuse key and ports from existing connection files
  --ping MS               heartbeat period in ms (default 3000)
  --scheme NAME           load-balancing scheme (leastload)
  --hwm N                 outstanding tasks per engine, 0 = unlimited (default 1)
  --record-limit N        task records kept (DictDB.record_limit, default 1024); past it
                          the oldest finished records are culled
  --size-limit BYTES      request and result buffer bytes kept (DictDB.size_limit, 1 GiB)
  --log-level LEVEL       10/DEBUG, 20/INFO (default), 30/WARN, 40/ERROR
  --dictdb                keep task records in memory (the default, stock's DictDB)
  --nodb                  keep no task records (stock's NoDB): less memory; results of
                          finished tasks, history, db queries and resubmit are unavailable
  --Class.trait=value     ipcontroller config options; applied where they mean
                          something here (TaskScheduler.scheme_name, TaskScheduler.hwm,
                          DictDB.record_limit, DictDB.size_limit, DictDB.cull_fraction,
                          HeartMonitor.period, ...), otherwise ignored with a warning
  -h, --help              this text
  --version               print pxcontroller's version and exit

The profile's ipcontroller_config.py is read as ipcontroller reads it, for its
`c.Class.trait = value` lines (HubFactory.* meaning IPController.*); the command line wins.

Environment: IPP_PROFILE_DIR, IPP_CLUSTER_ID, IPP_SESSION_KEY, IPYTHONDIR.
)";
}

namespace {

int to_int(const std::string& opt, const std::string& v) {
  int out = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec != std::errc() || p != v.data() + v.size())
    throw UsageError("option " + opt + " expects an integer, got '" + v + "'");
  return out;
}

// IPController.db_class (and the --nodb/--dictdb/--sqlitedb/--mongodb flags): stock's shortcuts
// (any case) or class paths. Only the in-memory store exists here; SQLiteDB and MongoDB are
// accepted as it, with a warning naming `opt` as given.
void set_db_class(Options& o, const std::string& opt, const std::string& v) {
  std::string s;
  for (char c : v) s += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (s == "nodb" || s == "ipyparallel.controller.dictdb.nodb") {
    o.keep_records = false;
  } else if (s == "dictdb" || s == "ipyparallel.controller.dictdb.dictdb") {
    o.keep_records = true;
  } else if (s == "sqlitedb" || s == "mongodb" || s == "ipyparallel.controller.sqlitedb.sqlitedb" ||
             s == "ipyparallel.controller.mongodb.mongodb") {
    o.keep_records = true;
    o.warnings.push_back(opt + ": pxcontroller keeps task records in memory (as DictDB)");
  } else {
    throw UsageError("option " + opt + ": unknown DB class '" + v + "' (NoDB, DictDB, SQLiteDB or MongoDB)");
  }
}

std::size_t to_size(const std::string& opt, const std::string& v) {
  unsigned long long out = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec != std::errc() || p != v.data() + v.size())
    throw UsageError("option " + opt + " expects a non-negative integer, got '" + v + "'");
  return static_cast<std::size_t>(out);
}

double to_double(const std::string& opt, const std::string& v) {
  char* end = nullptr;
  double d = std::strtod(v.c_str(), &end);
  if (v.empty() || *end) throw UsageError("option " + opt + " expects a number, got '" + v + "'");
  return d;
}

bool to_bool(const std::string& opt, const std::string& v) {
  if (v == "True" || v == "true" || v == "1") return true;
  if (v == "False" || v == "false" || v == "0") return false;
  throw UsageError("option " + opt + " expects True or False, got '" + v + "'");
}

// traitlets values may be quoted: --IPController.ip='"0.0.0.0"'
std::string unquote(std::string v) {
  if (v.size() >= 2 && (v.front() == '"' || v.front() == '\'') && v.back() == v.front())
    return v.substr(1, v.size() - 2);
  return v;
}

void check_transport(const std::string& opt, const std::string& v) {
  if (v != "tcp")
    throw UsageError("option " + opt + "=" + v + ": pxcontroller speaks tcp only (drop the option, or use tcp)");
}

// Stock's deprecated class names (IPController._deprecated_classes) mean IPController.
std::string canonical_class(const std::string& name) {
  for (const char* old : {"HubFactory.", "IPControllerApp."})
    if (name.rfind(old, 0) == 0) return "IPController." + name.substr(std::strlen(old));
  return name;
}

std::vector<int> parse_ports(const std::string& opt, const std::string& v) {
  std::vector<int> out;
  std::size_t start = 0;
  while (start <= v.size()) {
    auto comma = v.find(',', start);
    std::string part = v.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    auto dash = part.find('-');
    if (dash == std::string::npos) {
      out.push_back(to_int(opt, part));
    } else {
      int a = to_int(opt, part.substr(0, dash)), b = to_int(opt, part.substr(dash + 1));
      if (b < a || b - a > 65535) throw UsageError("option " + opt + ": bad port range '" + part + "'");
      for (int p = a; p <= b; ++p) out.push_back(p);
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace

namespace {

// One pass over `args`, of which the first `from_config` came from `config_path`.
std::optional<Options> parse_args(const std::vector<std::string>& args, std::size_t from_config,
                                  const std::string& config_path) {
  Options o;
  if (const char* v = std::getenv("IPP_ENABLE_CURVE"); v && std::string(v) == "1") o.curve = true;
  if (const char* v = std::getenv("IPP_CURVE_SECRETKEY"); v && *v) o.curve_secretkey = v;
  if (const char* v = std::getenv("IPP_CURVE_PUBLICKEY"); v && *v) o.curve_publickey = v;
  if (const char* v = std::getenv("IPP_PROFILE_DIR"); v && *v) o.profile.profile_dir = v;
  if (const char* v = std::getenv("IPP_CLUSTER_ID"); v && *v) o.profile.cluster_id = v;
  if (const char* v = std::getenv("IPP_SESSION_KEY"); v) {
    o.key = v;
    o.key_given = true;
  }

  using Setter = std::function<void(const std::string& opt, const std::string& value)>;
  // Options that take a value, by every spelling ipcontroller and its launchers use.
  std::map<std::string, Setter> valued = {
      {"profile", [&](auto&, auto& v) { o.profile.profile = v; }},
      {"profile-dir", [&](auto&, auto& v) { o.profile.profile_dir = v; }},
      {"cluster-id", [&](auto&, auto& v) { o.profile.cluster_id = v; }},
      {"ip", [&](auto&, auto& v) { o.ip = v; }},
      {"engine-ip", [&](auto&, auto& v) { o.engine_ip = v; }},
      {"location", [&](auto&, auto& v) { o.location = v; }},
      {"port", [&](auto& k, auto& v) { o.registration_port = to_int(k, v); }},
      {"ports", [&](auto& k, auto& v) { o.ports = parse_ports(k, v); }},
      {"ping", [&](auto& k, auto& v) { o.ping_ms = to_int(k, v); }},
      {"scheme", [&](auto&, auto& v) { o.scheme = v; }},
      {"hwm", [&](auto& k, auto& v) { o.hwm = to_int(k, v); }},
      {"log-level",
       [&](auto& k, auto& v) {
         if (!log::parse_level(v, o.log_level)) throw UsageError("option " + k + ": unknown log level '" + v + "'");
       }},
      {"ipython-dir", [&](auto&, auto& v) { ::setenv("IPYTHONDIR", v.c_str(), 1); }},
      // traitlets spellings that mean something here
      {"client-ip", [&](auto&, auto& v) { o.client_ip = v; }},
      {"ssh", [&](auto&, auto& v) { o.ssh_server = v; }},
      {"enginessh", [&](auto&, auto& v) { o.engine_ssh_server = v; }},
      {"transport", [&](auto& k, auto& v) { check_transport(k, v); }},
      {"IPController.ip", [&](auto&, auto& v) { o.ip = unquote(v); }},
      {"IPController.engine_ip", [&](auto&, auto& v) { o.engine_ip = unquote(v); }},
      {"IPController.client_ip", [&](auto&, auto& v) { o.client_ip = unquote(v); }},
      {"IPController.location", [&](auto&, auto& v) { o.location = unquote(v); }},
      {"IPController.ssh_server", [&](auto&, auto& v) { o.ssh_server = unquote(v); }},
      {"IPController.engine_ssh_server", [&](auto&, auto& v) { o.engine_ssh_server = unquote(v); }},
      {"IPController.transport", [&](auto& k, auto& v) { check_transport(k, unquote(v)); }},
      {"IPController.engine_transport", [&](auto& k, auto& v) { check_transport(k, unquote(v)); }},
      {"IPController.client_transport", [&](auto& k, auto& v) { check_transport(k, unquote(v)); }},
      {"IPController.monitor_ip", [](auto&, auto&) {}},  // stock's internal monitor socket: none here
      {"IPController.monitor_transport", [](auto&, auto&) {}},
      {"IPController.enable_curve", [&](auto& k, auto& v) { o.curve = to_bool(k, unquote(v)); }},
      {"IPController.curve_secretkey", [&](auto&, auto& v) { o.curve_secretkey = unquote(v); }},
      {"IPController.curve_publickey", [&](auto&, auto& v) { o.curve_publickey = unquote(v); }},
      {"IPController.reuse_files", [&](auto& k, auto& v) { o.reuse = to_bool(k, v); }},
      {"IPController.regport", [&](auto& k, auto& v) { o.registration_port = to_int(k, v); }},
      {"IPController.ports", [&](auto& k, auto& v) { o.ports = parse_ports(k, unquote(v)); }},
      {"IPController.registration_timeout", [&](auto& k, auto& v) { o.registration_timeout_s = to_double(k, v); }},
      {"HeartMonitor.period", [&](auto& k, auto& v) { o.ping_ms = to_int(k, v); }},
      {"HeartMonitor.max_heartmonitor_misses", [&](auto& k, auto& v) { o.max_heartbeat_misses = to_int(k, v); }},
      {"TaskScheduler.scheme_name", [&](auto&, auto& v) { o.scheme = unquote(v); }},
      {"TaskScheduler.hwm", [&](auto& k, auto& v) { o.hwm = to_int(k, v); }},
      {"DictDB.record_limit", [&](auto& k, auto& v) { o.record_limit = to_size(k, v); }},
      {"DictDB.size_limit", [&](auto& k, auto& v) { o.size_limit = to_size(k, v); }},
      {"DictDB.cull_fraction", [&](auto& k, auto& v) { o.cull_fraction = to_double(k, v); }},
      {"record-limit", [&](auto& k, auto& v) { o.record_limit = to_size(k, v); }},
      {"IPController.db_class", [&](auto& k, auto& v) { set_db_class(o, k + "=" + v, unquote(v)); }},
      {"HubFactory.db_class", [&](auto& k, auto& v) { set_db_class(o, k + "=" + v, unquote(v)); }},
      {"size-limit", [&](auto& k, auto& v) { o.size_limit = to_size(k, v); }},
      {"Session.key",
       [&](auto&, auto& v) {
         o.key = unquote(v);
         o.key_given = true;
       }},
      {"Session.signature_scheme", [&](auto&, auto& v) { o.signature_scheme = unquote(v); }},
      {"ProfileDir.location", [&](auto&, auto& v) { o.profile.profile_dir = unquote(v); }},
      {"BaseIPythonApplication.profile", [&](auto&, auto& v) { o.profile.profile = unquote(v); }},
      {"BaseParallelApplication.cluster_id", [&](auto&, auto& v) { o.profile.cluster_id = unquote(v); }},
      {"Application.log_level",
       [&](auto& k, auto& v) {
         if (!log::parse_level(unquote(v), o.log_level))
           throw UsageError("option " + k + ": unknown log level '" + v + "'");
       }},
  };
  std::map<std::string, std::function<void()>> flags = {
      {"reuse", [&] { o.reuse = true; }},
      {"curve", [&] { o.curve = true; }},
      {"dictdb", [&] { set_db_class(o, "--dictdb", "dictdb"); }},
      {"nodb", [&] { set_db_class(o, "--nodb", "nodb"); }},  // stock's NoDB: no task records at all
      {"sqlitedb", [&] { set_db_class(o, "--sqlitedb", "sqlitedb"); }},
      {"mongodb", [&] { set_db_class(o, "--mongodb", "mongodb"); }},
      {"secure", [] {}},
      {"no-secure",
       [&] {
         o.key.clear();
         o.key_given = true;
       }},
      {"debug", [&] { o.log_level = log::debug; }},
      {"quiet", [&] { o.log_level = log::critical; }},
      {"log-to-file", [&] { o.warnings.push_back("--log-to-file: pxcontroller logs to stderr"); }},
      {"restore", [&] { o.warnings.push_back("--restore: engine state is not restored by pxcontroller"); }},
  };

  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "-h" || a == "--help" || a == "--help-all") {
      std::cout << usage();
      return std::nullopt;
    }
    if (a.rfind("--", 0) != 0) throw UsageError("unexpected argument '" + a + "' (see --help)");
    std::string name = a.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    name = canonical_class(name);
    if (auto f = flags.find(name); f != flags.end()) {
      if (has_value) throw UsageError("option --" + name + " takes no value");
      f->second();
      continue;
    }
    auto v = valued.find(name);
    bool traitlet = name.find('.') != std::string::npos;
    if (v == valued.end() && !traitlet) throw UsageError("unknown option '--" + name + "' (see --help)");
    if (!has_value) {
      if (i + 1 >= args.size()) throw UsageError("option --" + name + " needs a value");
      value = args[++i];
    }
    const bool config = i < from_config;
    if (v != valued.end()) {
      try {
        v->second("--" + name, value);
      } catch (const UsageError& e) {
        if (!config) throw;
        throw UsageError(config_path + ": c." + name + ": " + e.what());
      }
    } else if (config) {
      o.warnings.push_back(config_path + ": c." + name + " has no meaning for pxcontroller; ignored");
    } else {
      o.warnings.push_back("--" + name + " has no meaning for pxcontroller; ignored");
    }
  }
  if (o.client_ip.empty()) o.client_ip = o.ip;
  if (o.engine_ip.empty()) o.engine_ip = o.ip;
  if (o.curve_secretkey.empty() != o.curve_publickey.empty())
    throw UsageError("CurveZMQ keys: give both curve_secretkey and curve_publickey (Z85, 40 characters), or neither");
  for (const auto* k : {&o.curve_secretkey, &o.curve_publickey})
    if (!k->empty() && k->size() != 40)
      throw UsageError("CurveZMQ key '" + *k + "' is not 40 Z85 characters (zmq.curve_keypair() makes a pair)");
  if (o.ping_ms <= 0) throw UsageError("--ping must be a positive number of milliseconds");
  if (o.hwm < 0) throw UsageError("--hwm must be 0 (unlimited) or more");
  if (!(o.cull_fraction > 0 && o.cull_fraction <= 1)) throw UsageError("--DictDB.cull_fraction must be in (0, 1]");
  static const char* schemes[] = {"leastload", "lru", "plainrandom", "twobin", "weighted"};
  bool known = false;
  for (auto s : schemes) known = known || o.scheme == s;
  if (!known)
    throw UsageError("--scheme '" + o.scheme + "' is not one of leastload, lru, plainrandom, twobin, weighted");
  return o;
}

}  // namespace

std::optional<Options> parse_options(const std::vector<std::string>& args) {
  // First the command line alone, to find the profile; then the profile's config file's
  // assignments followed by the command line, so that the command line wins.
  auto first = parse_args(args, 0, "");
  if (!first) return first;
  fs::path config;
  try {
    config = conn::resolve_profile(first->profile).profile_dir / "ipcontroller_config.py";
  } catch (const std::exception&) {
    return first;  // the controller reports the profile problem itself
  }
  std::error_code ec;
  if (!fs::is_regular_file(config, ec)) return first;
  std::vector<std::string> warnings;
  std::vector<std::string> all = read_config_file(config.string(), warnings);
  const std::size_t n = all.size();
  all.insert(all.end(), args.begin(), args.end());
  auto o = parse_args(all, n, config.string());
  if (o) o->warnings.insert(o->warnings.begin(), warnings.begin(), warnings.end());
  return o;
}

namespace {

// A Python literal, as the command line would spell it: strings unquoted, True/False, numbers,
// lists and tuples of those joined with commas. False when `text` is not such a literal.
bool literal_value(std::string text, std::string& out) {
  auto trim = [](std::string t) {
    auto b = t.find_first_not_of(" \t");
    auto e = t.find_last_not_of(" \t");
    return b == std::string::npos ? std::string() : t.substr(b, e - b + 1);
  };
  text = trim(text);
  if (text.empty()) return false;
  char first = text.front();
  if ((first == '[' || first == '(') && text.size() >= 2 && text.back() == (first == '[' ? ']' : ')')) {
    std::string inner = text.substr(1, text.size() - 2), joined, item;
    // split on commas outside quotes
    char quote = 0;
    std::vector<std::string> items;
    for (char c : inner) {
      if (quote) {
        item += c;
        if (c == quote) quote = 0;
      } else if (c == '\'' || c == '"') {
        quote = c;
        item += c;
      } else if (c == ',') {
        items.push_back(item);
        item.clear();
      } else {
        item += c;
      }
    }
    if (!trim(item).empty()) items.push_back(item);
    for (auto& it : items) {
      std::string v;
      if (!literal_value(it, v)) return false;
      joined += (joined.empty() ? "" : ",") + v;
    }
    out = joined;
    return true;
  }
  std::size_t start = 0;
  while (start < text.size() && std::strchr("uUrRbB", text[start]) && start < 2) ++start;
  if (start < text.size() && (text[start] == '\'' || text[start] == '"')) {
    char q = text[start];
    if (text.size() - start < 2 || text.back() != q) return false;
    std::string body = text.substr(start + 1, text.size() - start - 2);
    if (body.find(q) != std::string::npos) return false;
    out = body;
    return true;
  }
  if (text == "True" || text == "False") {
    out = text;
    return true;
  }
  char* end = nullptr;
  std::strtod(text.c_str(), &end);
  if (end && *end == 0) {
    out = text;
    return true;
  }
  return false;
}

}  // namespace

std::vector<std::string> read_config_file(const std::string& path, std::vector<std::string>& warnings) {
  std::vector<std::string> out;
  std::ifstream in(path);
  if (!in) {
    warnings.push_back(path + ": cannot read; ignored");
    return out;
  }
  std::string line, stmt;
  int lineno = 0, start_line = 0, depth = 0;
  auto strip_comment = [](const std::string& l) {
    char quote = 0;
    for (std::size_t i = 0; i < l.size(); ++i) {
      if (quote) {
        if (l[i] == quote) quote = 0;
      } else if (l[i] == '\'' || l[i] == '"') {
        quote = l[i];
      } else if (l[i] == '#') {
        return l.substr(0, i);
      }
    }
    return l;
  };
  while (std::getline(in, line)) {
    ++lineno;
    std::string l = strip_comment(line);
    if (stmt.empty()) start_line = lineno;
    stmt += (stmt.empty() ? "" : " ") + l;
    for (char c : l) depth += (c == '[' || c == '(' || c == '{') - (c == ']' || c == ')' || c == '}');
    if (depth > 0) continue;  // a literal that spans lines
    depth = 0;
    std::string s = stmt;
    stmt.clear();
    auto b = s.find_first_not_of(" \t");
    if (b == std::string::npos) continue;
    s = s.substr(b);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.pop_back();
    if (s.rfind("import ", 0) == 0 || s.rfind("from ", 0) == 0 || s == "c = get_config()" ||
        s == "c = get_config()  " || s.rfind("c=get_config()", 0) == 0)
      continue;
    const std::string where = path + ":" + std::to_string(start_line);
    auto eq = s.find('=');
    if (s.rfind("c.", 0) != 0 || eq == std::string::npos || s.compare(eq, 2, "==") == 0) {
      warnings.push_back(where + ": cannot read '" + s +
                         "' (pxcontroller reads only `c.Class.trait = value` lines); ignored");
      continue;
    }
    std::string name = s.substr(2, eq - 2);
    while (!name.empty() && name.back() == ' ') name.pop_back();
    std::string value;
    if (std::count(name.begin(), name.end(), '.') != 1 || !literal_value(s.substr(eq + 1), value)) {
      warnings.push_back(where + ": cannot read '" + s +
                         "' (only literal strings, numbers, booleans and lists of them); ignored");
      continue;
    }
    out.push_back("--" + name + "=" + value);
  }
  return out;
}

}  // namespace pxf::controller
