#include "wire/signer.hpp"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#include <cstring>
#include <stdexcept>

// The SHA256_* functions are deprecated in OpenSSL 3 in favour of EVP, whose per-call context
// handling is what this fast path avoids. They remain part of libcrypto 3.
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

namespace pxf::wire {

struct Signer::Sha256Pads {
  SHA256_CTX inner, outer;  // states after hashing key ^ ipad and key ^ opad
  explicit Sha256Pads(std::string_view key) {
    unsigned char block[SHA256_CBLOCK] = {};
    if (key.size() > SHA256_CBLOCK) {
      SHA256(reinterpret_cast<const unsigned char*>(key.data()), key.size(), block);
    } else {
      std::memcpy(block, key.data(), key.size());
    }
    unsigned char pad[SHA256_CBLOCK];
    for (std::size_t i = 0; i < sizeof pad; ++i) pad[i] = block[i] ^ 0x36;
    SHA256_Init(&inner);
    SHA256_Update(&inner, pad, sizeof pad);
    for (std::size_t i = 0; i < sizeof pad; ++i) pad[i] = block[i] ^ 0x5c;
    SHA256_Init(&outer);
    SHA256_Update(&outer, pad, sizeof pad);
    OPENSSL_cleanse(block, sizeof block);
    OPENSSL_cleanse(pad, sizeof pad);
  }
  ~Sha256Pads() {
    OPENSSL_cleanse(&inner, sizeof inner);
    OPENSSL_cleanse(&outer, sizeof outer);
  }
};

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
  if (digest == "sha256" || digest == "SHA256") {
    sha256_ = std::make_unique<Sha256Pads>(key_);
    return;
  }
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
  unsigned char raw[EVP_MAX_MD_SIZE];
  std::size_t len = 0;
  if (sha256_) {
    SHA256_CTX ctx = sha256_->inner;
    for (auto part : {h, p, m, c}) SHA256_Update(&ctx, part.data(), part.size());
    unsigned char inner[SHA256_DIGEST_LENGTH];
    SHA256_Final(inner, &ctx);
    ctx = sha256_->outer;
    SHA256_Update(&ctx, inner, sizeof inner);
    SHA256_Final(raw, &ctx);
    len = SHA256_DIGEST_LENGTH;
  } else {
    EVP_MAC_CTX* ctx = EVP_MAC_CTX_dup(proto_->ctx);
    if (!ctx) throw std::bad_alloc();
    bool ok = true;
    for (auto part : {h, p, m, c})
      ok = ok && EVP_MAC_update(ctx, reinterpret_cast<const unsigned char*>(part.data()), part.size()) == 1;
    ok = ok && EVP_MAC_final(ctx, raw, &len, sizeof raw) == 1;
    EVP_MAC_CTX_free(ctx);
    if (!ok) throw std::runtime_error("HMAC computation failed");
  }
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

}  // namespace pxf::wire
