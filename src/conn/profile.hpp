#pragma once
// Where connection files live, found by the same rules as the stock tools:
// <profile_dir>/security/ipcontroller[-<cluster_id>]-{client,engine}.json, with the profile
// dir from --profile-dir, --profile (under $IPYTHONDIR or ~/.ipython), or $IPP_PROFILE_DIR,
// and the cluster id from --cluster-id or $IPP_CLUSTER_ID.
#include <filesystem>
#include <optional>
#include <string>

namespace pxf::conn {

namespace fs = std::filesystem;

// $IPYTHONDIR, else ~/.ipython.
fs::path ipython_dir();

struct ProfileRequest {
  std::optional<std::string> profile;      // --profile NAME
  std::optional<fs::path> profile_dir;     // --profile-dir DIR
  std::optional<std::string> cluster_id;   // --cluster-id ID
};

struct ProfileLocation {
  fs::path profile_dir;
  std::string cluster_id;  // "" when none

  fs::path security_dir() const { return profile_dir / "security"; }
  fs::path log_dir() const { return profile_dir / "log"; }
  fs::path client_file() const;  // security/ipcontroller[-<id>]-client.json
  fs::path engine_file() const;  // security/ipcontroller[-<id>]-engine.json
};

// Applies the stock precedence (explicit options first, then IPP_PROFILE_DIR / IPP_CLUSTER_ID,
// then profile "default"). Does not create anything.
ProfileLocation resolve_profile(const ProfileRequest& req);

// Creates profile_dir/{security,log} (security with mode 0700) if missing.
void ensure_profile_dirs(const ProfileLocation& loc);

// "ipcontroller-client.json" or "ipcontroller-<id>-client.json" (kind = "client" | "engine").
std::string connection_file_name(const std::string& cluster_id, const std::string& kind);

} // namespace pxf::conn
