// Signer: HMAC over the exact bytes of the four JSON frames, as jupyter_client.Session signs.
// Expected digests were computed with /usr/bin/python3:
//   hmac.new(key, header + parent + metadata + content, hashlib.sha256).hexdigest()
#include "wire/signer.hpp"

#include <gtest/gtest.h>

#include <cctype>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using pxf::wire::Signer;

constexpr const char* kKey = "pxfabric-test-key";
const std::string kHeader = R"({"msg_id":"a_1_1","msg_type":"apply_request"})";
const std::string kParent = "{}";
const std::string kMetadata = "{\"engine\":\"\xc3\xa9t\xc3\xa9\"}";  // raw UTF-8, as ensure_ascii=False sends
const std::string kContent = R"j({"code": "print(1)"})j";
constexpr const char* kSha256 = "f8b8542ddf068e52f01e7ada7d25226e0c379f375bf6aecbe593a3954eb98c26";
constexpr const char* kSha512 = "8098e9fea734b5555c54ab0642a90cccd60bfecf30e9e0992528e80b23b6c032"
                                "50456618ffc1f3faba7446c88a74757a8310408b15de4734fcfa56aaf4ac2cc4";

TEST(Signer, Sha256MatchesPythonHmac) {
  Signer s(kKey);
  EXPECT_TRUE(s.enabled());
  EXPECT_EQ(s.scheme(), "hmac-sha256");
  EXPECT_EQ(s.sign(kHeader, kParent, kMetadata, kContent), kSha256);
}

// The sha256 fast path pads the key itself: keys at, just over and well over the 64-byte
// block size (longer keys are hashed first), and messages spanning many blocks.
TEST(Signer, Sha256KeyLengthsAndLongMessagesMatchPythonHmac) {
  struct Case {
    std::string key;
    const char* sig;
    const char* sig_long;
  };
  const Case cases[] = {
      {std::string(64, 'k'), "0045e59334072c9f286a84a1c11f276ff30ccaafd183ea8e708f18a3f2b39ca0",
       "ff12345abcf356a1a6e68918a91fbc3016821aae4ecabbbc9cf73a88e58c2572"},
      {std::string(65, 'K'), "ba7e003493342f9da72a21ace6e9663e6f014f074383ad55fe6dadeed8359250",
       "8febf91ae94fc4e2e05d06ef2a378f4ef27390c0eccc3344d38ae87fa17e4fa2"},
      {std::string(200, 'x'), "435fd6935c7abc4208b434f77b351fb2db962658b01c9392a64c9ba6192dad06",
       "cef72c7f404417f276af7e216b028905691c1bec3b5ac4b384701ecba6b1c607"},
  };
  const std::string long_content = kContent + std::string(1000, 'y');
  for (const auto& c : cases) {
    Signer s(c.key);
    EXPECT_EQ(s.sign(kHeader, kParent, kMetadata, kContent), c.sig) << c.key.size();
    EXPECT_EQ(s.sign(kHeader, kParent, kMetadata, long_content), c.sig_long) << c.key.size();
    EXPECT_TRUE(s.verify(c.sig_long, kHeader, kParent, kMetadata, long_content));
  }
}

TEST(Signer, Sha512MatchesPythonHmac) {
  Signer s(kKey, "hmac-sha512");
  std::string sig = s.sign(kHeader, kParent, kMetadata, kContent);
  EXPECT_EQ(sig.size(), 128u);
  EXPECT_EQ(sig, kSha512);
}

TEST(Signer, SignsConcatenationWithoutSeparators) {
  // Python signs b"".join(frames): moving a byte across a frame boundary keeps the digest.
  Signer s(kKey);
  EXPECT_EQ(s.sign("ab", "c", "d", "e"), s.sign("a", "bc", "d", "e"));
  EXPECT_EQ(s.sign(kHeader + kParent, "", kMetadata, kContent), kSha256);
  EXPECT_NE(s.sign("ab", "c", "d", "e"), s.sign("ab", "c", "d", "f"));
}

TEST(Signer, DifferentKeysDifferentSignatures) {
  Signer a(kKey), b("another-key");
  EXPECT_NE(a.sign(kHeader, kParent, kMetadata, kContent), b.sign(kHeader, kParent, kMetadata, kContent));
}

TEST(Signer, VerifyAcceptsOnlyTheExactLowercaseHex) {
  Signer s(kKey);
  std::string good = kSha256;
  EXPECT_TRUE(s.verify(good, kHeader, kParent, kMetadata, kContent));

  std::string first = good, last = good, upper = good;
  first[0] = first[0] == '0' ? '1' : '0';
  last.back() = last.back() == '0' ? '1' : '0';
  for (auto& ch : upper) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  EXPECT_FALSE(s.verify(first, kHeader, kParent, kMetadata, kContent));
  EXPECT_FALSE(s.verify(last, kHeader, kParent, kMetadata, kContent));
  EXPECT_FALSE(s.verify(upper, kHeader, kParent, kMetadata, kContent));  // Python compares hex bytes
  EXPECT_FALSE(s.verify(good.substr(0, 63), kHeader, kParent, kMetadata, kContent));
  EXPECT_FALSE(s.verify(good + "0", kHeader, kParent, kMetadata, kContent));
  EXPECT_FALSE(s.verify("", kHeader, kParent, kMetadata, kContent));
  // Same signature, one changed byte in a signed frame.
  EXPECT_FALSE(s.verify(good, kHeader, kParent, kMetadata, R"j({"code": "print(2)"})j"));
}

TEST(Signer, VerifyRejectsAMismatchAtAnyPosition) {
  // verify() compares with CRYPTO_memcmp (constant time); timing itself belongs in bench/. Here:
  // a mismatch anywhere, even after a long matching prefix or at a NUL, is caught (no strcmp
  // and no early exit that skips the tail).
  Signer s(kKey);
  std::string good = kSha256;
  for (std::size_t i = 0; i < good.size(); ++i) {
    std::string bad = good;
    bad[i] = '\0';
    EXPECT_FALSE(s.verify(bad, kHeader, kParent, kMetadata, kContent)) << "position " << i;
  }
}

TEST(Signer, EmptyKeyIsUnsignedMode) {
  Signer s("");
  EXPECT_FALSE(s.enabled());
  EXPECT_EQ(s.sign(kHeader, kParent, kMetadata, kContent), "");
}

TEST(Signer, RejectsUnknownSchemes) {
  EXPECT_THROW(Signer(kKey, "hmac-nosuchdigest"), std::invalid_argument);
  EXPECT_THROW(Signer(kKey, "sha256"), std::invalid_argument);
  EXPECT_THROW(Signer(kKey, "hmac-"), std::invalid_argument);
  EXPECT_THROW(Signer(kKey, ""), std::invalid_argument);
  // The scheme is checked even in unsigned mode, so a typo is caught before a key is set.
  EXPECT_THROW(Signer("", "hmac-nosuchdigest"), std::invalid_argument);
}

TEST(Signer, SignsConsistentlyFromManyThreads) {
  Signer s(kKey);
  std::vector<std::string> results(8);
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < results.size(); ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        std::string sig = s.sign(kHeader, kParent, kMetadata, kContent);
        if (sig != kSha256) {
          results[t] = sig;
          return;
        }
      }
      results[t] = kSha256;
    });
  for (auto& th : threads) th.join();
  for (auto& r : results) EXPECT_EQ(r, kSha256);
}

}  // namespace
