#pragma once
// HMAC signing of the four JSON frames, as jupyter_client.Session does it.
#include <memory>

#include <string>
#include <string_view>

namespace pxf::wire {

class Signer {
 public:
  // `scheme` is "hmac-<digest>" (e.g. "hmac-sha256"); an empty key means unsigned mode.
  // Throws std::invalid_argument for an unknown digest.
  Signer(std::string key, std::string_view scheme = "hmac-sha256");
  ~Signer();
  Signer(const Signer&) = delete;
  Signer& operator=(const Signer&) = delete;

  bool enabled() const { return !key_.empty(); }
  const std::string& scheme() const { return scheme_; }

  // Lowercase hex HMAC over the concatenated exact bytes of the four frames ("" when unsigned).
  std::string sign(std::string_view header, std::string_view parent, std::string_view metadata,
                   std::string_view content) const;

  // Constant-time comparison of `signature` with the expected one.
  bool verify(std::string_view signature, std::string_view header, std::string_view parent, std::string_view metadata,
              std::string_view content) const;

 private:
  std::string key_;
  std::string scheme_;
  // A MAC context keyed once; each signature works on a duplicate (safe from any thread).
  struct Proto;
  std::unique_ptr<Proto> proto_;
  // hmac-sha256 (the default scheme) skips the EVP layer: the SHA-256 states after the inner
  // and outer key pads are computed once and copied per signature (a third of the cost of a
  // short message's HMAC was context duplication).
  struct Sha256Pads;
  std::unique_ptr<Sha256Pads> sha256_;
};

}  // namespace pxf::wire
