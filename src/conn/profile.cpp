#include "conn/profile.hpp"

#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace pxf::conn {

namespace {

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return std::nullopt;
  return std::string(v);
}

std::optional<std::string> env_nonempty(const char* name) {
  auto v = env(name);
  if (v && v->empty()) return std::nullopt;
  return v;
}

// Python's os.path.expanduser('~'): $HOME, else the password database.
std::string home_dir() {
  if (auto h = env_nonempty("HOME")) return *h;
  if (const passwd* pw = ::getpwuid(::getuid()); pw != nullptr && pw->pw_dir != nullptr) return pw->pw_dir;
  return "/";
}

// Python's posixpath.expanduser: "~" / "~/x" / "~user/x"; anything else, or an unknown user,
// is returned unchanged.
std::string expand_user(const std::string& s) {
  if (s.empty() || s[0] != '~') return s;
  const auto slash = s.find('/', 1);
  const std::size_t end = slash == std::string::npos ? s.size() : slash;
  std::string home;
  if (end == 1) {
    home = home_dir();
  } else {
    const std::string user = s.substr(1, end - 1);
    const passwd* pw = ::getpwnam(user.c_str());
    if (pw == nullptr || pw->pw_dir == nullptr) return s;
    home = pw->pw_dir;
  }
  while (home.size() > 1 && home.back() == '/') home.pop_back();
  std::string out = home + s.substr(end);
  return out.empty() ? "/" : out;
}

// Python's posixpath.expandvars: $name or ${name} (name = ASCII word chars); unknown variables
// are left as written.
std::string expand_vars(const std::string& s) {
  std::string out;
  std::size_t i = 0;
  while (i < s.size()) {
    if (s[i] != '$') {
      out += s[i++];
      continue;
    }
    std::size_t name_begin = i + 1, name_end = name_begin, next = name_begin;
    if (name_begin < s.size() && s[name_begin] == '{') {
      const auto close = s.find('}', name_begin + 1);
      if (close == std::string::npos) {
        out += s[i++];
        continue;
      }
      name_begin += 1;
      name_end = close;
      next = close + 1;
    } else {
      while (name_end < s.size() && (std::isalnum(static_cast<unsigned char>(s[name_end])) != 0 || s[name_end] == '_'))
        ++name_end;
      next = name_end;
    }
    const std::string name = s.substr(name_begin, name_end - name_begin);
    const auto value = name.empty() ? std::nullopt : env(name.c_str());
    if (value) {
      out += *value;
    } else {
      out += s.substr(i, next - i);
    }
    i = next;
  }
  return out;
}

// Absolute, normalized, no trailing slash (like os.path.abspath).
fs::path absolute_normal(const fs::path& p) {
  fs::path out = fs::absolute(p).lexically_normal();
  if (!out.has_filename() && out.has_relative_path()) out = out.parent_path();
  return out;
}

// IPython's expand_path: ~ first, then $VARS.
fs::path expand_path(const fs::path& p) { return absolute_normal(expand_vars(expand_user(p.string()))); }

bool writable_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec) && ::access(p.c_str(), W_OK) == 0;
}

}  // namespace

fs::path ipython_dir() {
  if (auto d = env_nonempty("IPYTHONDIR")) return absolute_normal(expand_user(*d));
  if (auto d = env_nonempty("IPYTHON_DIR")) return absolute_normal(expand_user(*d));  // deprecated
  std::error_code ec;
  fs::path home = fs::weakly_canonical(home_dir(), ec);  // IPython realpaths the home dir
  if (ec) home = home_dir();
  fs::path dir = home / ".ipython";
  // IPython <= 1.x used $XDG_CONFIG_HOME/ipython; IPython still honours an existing one when
  // ~/.ipython does not exist.
  const fs::path xdg = env_nonempty("XDG_CONFIG_HOME").value_or((home / ".config").string());
  if (writable_dir(xdg)) {
    const fs::path legacy = xdg / "ipython";
    if (writable_dir(legacy) && !fs::exists(dir, ec) && !fs::is_symlink(legacy, ec)) dir = legacy;
  }
  return absolute_normal(dir);
}

fs::path ProfileLocation::client_file() const { return security_dir() / connection_file_name(cluster_id, "client"); }

fs::path ProfileLocation::engine_file() const { return security_dir() / connection_file_name(cluster_id, "engine"); }

ProfileLocation resolve_profile(const ProfileRequest& req) {
  ProfileLocation loc;
  if (req.profile_dir && !req.profile_dir->empty()) {
    loc.profile_dir = expand_path(*req.profile_dir);
  } else if (auto d = env_nonempty("IPP_PROFILE_DIR")) {
    loc.profile_dir = expand_path(*d);
  } else {
    const fs::path base = req.ipython_dir && !req.ipython_dir->empty() ? expand_path(*req.ipython_dir) : ipython_dir();
    const std::string name = req.profile && !req.profile->empty() ? *req.profile : "default";
    loc.profile_dir = base / ("profile_" + name);
  }
  // An explicit --cluster-id="" overrides $IPP_CLUSTER_ID, as on the stock command line.
  loc.cluster_id = req.cluster_id ? *req.cluster_id : env("IPP_CLUSTER_ID").value_or("");
  return loc;
}

void ensure_profile_dirs(const ProfileLocation& loc) {
  auto make = [](const fs::path& dir, std::optional<mode_t> mode) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) throw ConnectionFileError(dir.string() + ": cannot create folder: " + ec.message());
    if (!fs::is_directory(dir, ec)) throw ConnectionFileError(dir.string() + ": exists but is not a folder");
    if (!mode) return;
    struct stat st {};
    if (::stat(dir.c_str(), &st) != 0)
      throw ConnectionFileError(dir.string() + ": cannot stat: " + std::strerror(errno));
    // Like IPython's ProfileDir: tighten an existing security folder too. Stock only warns when
    // that fails; a world-readable folder next to the HMAC key is worth stopping for.
    if ((st.st_mode & 07777) != *mode && ::chmod(dir.c_str(), *mode) != 0)
      throw ConnectionFileError(dir.string() + ": cannot set mode 0700: " + std::strerror(errno) +
                                " (it holds the connection files; fix its owner or mode)");
  };
  make(loc.profile_dir, std::nullopt);
  make(loc.security_dir(), 0700);
  make(loc.log_dir(), std::nullopt);
}

std::string connection_file_name(const std::string& cluster_id, const std::string& kind) {
  if (kind != "client" && kind != "engine")
    throw std::invalid_argument("connection_file_name: kind must be \"client\" or \"engine\", got \"" + kind + "\"");
  const std::string base = cluster_id.empty() ? "ipcontroller" : "ipcontroller-" + cluster_id;
  return base + "-" + kind + ".json";
}

}  // namespace pxf::conn
