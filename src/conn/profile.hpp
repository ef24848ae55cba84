#pragma once
// Where connection files live, found by the same rules as the stock tools:
// <profile_dir>/security/ipcontroller[-<cluster_id>]-{client,engine}.json, with the profile
// dir from --profile-dir, $IPP_PROFILE_DIR or --profile (under $IPYTHONDIR or ~/.ipython), and
// the cluster id from --cluster-id or $IPP_CLUSTER_ID (precedence: resolve_profile below).
#include "conn/connection_file.hpp"  // ConnectionFileError

#include <filesystem>
#include <optional>
#include <string>

namespace pxf::conn {

namespace fs = std::filesystem;

// IPython's get_ipython_dir(), made absolute: $IPYTHONDIR, else the deprecated $IPYTHON_DIR,
// else ~/.ipython (realpath of home), except that a writable legacy $XDG_CONFIG_HOME/ipython
// (default ~/.config/ipython) is used when ~/.ipython does not exist. "~" is expanded.
// Unlike IPython it creates nothing and never falls back to a temp dir.
fs::path ipython_dir();

// Initialized members keep `resolve_profile({.profile = "x"})` free of -Wmissing-field-initializers.
struct ProfileRequest {
  std::optional<std::string> profile = std::nullopt;     // --profile NAME
  std::optional<fs::path> profile_dir = std::nullopt;    // --profile-dir DIR
  std::optional<std::string> cluster_id = std::nullopt;  // --cluster-id ID
  std::optional<fs::path> ipython_dir = std::nullopt;    // --ipython-dir DIR (overrides ipython_dir())
};

struct ProfileLocation {
  fs::path profile_dir;
  std::string cluster_id;  // "" when none

  fs::path security_dir() const { return profile_dir / "security"; }
  fs::path log_dir() const { return profile_dir / "log"; }
  fs::path client_file() const;  // security/ipcontroller[-<id>]-client.json
  fs::path engine_file() const;  // security/ipcontroller[-<id>]-engine.json
};

// Applies the stock precedence. Does not create anything.
//
// Profile dir (first that applies):
//   1. --profile-dir DIR
//   2. $IPP_PROFILE_DIR                 <- beats --profile NAME, as in stock ipyparallel 8.x/9.x
//   3. --profile NAME                   -> <ipython_dir>/profile_NAME
//   4. <ipython_dir>/profile_default
// Cluster id: --cluster-id (even "") > $IPP_CLUSTER_ID (even "") > "".
//
// Why 2 beats 3: ipyparallel >= 8 copies IPP_PROFILE_DIR into the config as ProfileDir.location
// before parsing argv; --profile-dir overwrites that value, but --profile only sets the profile
// name, which IPython uses solely when ProfileDir.location is unset. (7.1 ignores both
// variables; ipcluster 7.1 passes --profile-dir/--cluster-id instead, so honouring them changes
// nothing for 7.1 launches.) tests/integration/test_connection_files.py compares this function
// with IPython's application code plus that logic.
//
// Paths get "~" and "$VAR" expanded (like IPython's expand_path) and are made absolute against
// the current directory. Deliberate deviations from stock: an empty --profile, --profile-dir or
// $IPP_PROFILE_DIR counts as unset (stock would use "profile_" / the current directory); "~" is
// always expanded (stock creates a missing "~/x" under its literal name, and a "~" in
// $IPP_PROFILE_DIR crashes 8.x with "Cannot set profile location more than once").
ProfileLocation resolve_profile(const ProfileRequest& req);

// Creates profile_dir/{security,log} if missing; security gets mode 0700 even if it existed (as
// IPython's ProfileDir does). Throws ConnectionFileError naming the folder on failure.
void ensure_profile_dirs(const ProfileLocation& loc);

// "ipcontroller-client.json" or "ipcontroller-<id>-client.json" (kind = "client" | "engine";
// anything else throws std::invalid_argument).
std::string connection_file_name(const std::string& cluster_id, const std::string& kind);

}  // namespace pxf::conn
