#include "wire/signer.hpp"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <stdexcept>

namespace pxf::wire {

struct Signer::Proto {
  EVP_MAC* mac = nullptr;
  EVP_MAC_CTX* ctx = nullptr;
  ~Proto() {
    EVP_MAC_CTX_free(ctx);
    EVP_MAC_free(mac);
  }
};

Signer::Signer(std::string key, std::string_view scheme) : key_(std::move(key)), scheme_(scheme) {
  constexpr std::string_view prefix = "hmac-";
  if (scheme.substr(0, prefix.size()) != prefix)
    throw std::invalid_argument("signature_scheme must look like 'hmac-sha256', got '" + scheme_ + "'");
  std::string digest(scheme.substr(prefix.size()));
  if (!EVP_get_digestbyname(digest.c_str()))
    throw std::invalid_argument("unknown signature_scheme digest '" + digest + "'");
  if (key_.empty()) return;
  proto_ = std::make_unique<Proto>();
  proto_->mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
  if (!proto_->mac || !(proto_->ctx = EVP_MAC_CTX_new(proto_->mac)))
    throw std::runtime_error("OpenSSL HMAC is unavailable");
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest.data(), 0),
                         OSSL_PARAM_construct_end()};
  if (EVP_MAC_init(proto_->ctx, reinterpret_cast<const unsigned char*>(key_.data()), key_.size(), params) != 1)
    throw std::invalid_argument("cannot initialise HMAC with digest '" + digest + "'");
}

Signer::~Signer() = default;

std::string Signer::sign(std::string_view h, std::string_view p, std::string_view m, std::string_view c) const {
  if (!enabled()) return {};
  EVP_MAC_CTX* ctx = EVP_MAC_CTX_dup(proto_->ctx);
  if (!ctx) throw std::bad_alloc();
  bool ok = true;
  for (auto part : {h, p, m, c})
    ok = ok && EVP_MAC_update(ctx, reinterpret_cast<const unsigned char*>(part.data()), part.size()) == 1;
  unsigned char raw[EVP_MAX_MD_SIZE];
  std::size_t len = 0;
  ok = ok && EVP_MAC_final(ctx, raw, &len, sizeof raw) == 1;
  EVP_MAC_CTX_free(ctx);
  if (!ok) throw std::runtime_error("HMAC computation failed");
  static constexpr char digits[] = "0123456789abcdef";
  std::string hex(2 * len, '0');
  for (std::size_t i = 0; i < len; ++i) {
    hex[2 * i] = digits[raw[i] >> 4];
    hex[2 * i + 1] = digits[raw[i] & 0xf];
  }
  return hex;
}

bool Signer::verify(std::string_view signature, std::string_view h, std::string_view p, std::string_view m,
                     std::string_view c) const {
  std::string expected = sign(h, p, m, c);
  if (signature.size() != expected.size()) return false;
  return CRYPTO_memcmp(signature.data(), expected.data(), expected.size()) == 0;
}

} // namespace pxf::wire
