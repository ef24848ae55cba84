#pragma once
// Identifiers in the formats jupyter_client uses, so peers cannot tell us apart.
#include <cstddef>
#include <string>

namespace pxf {

// A fresh random id like jupyter_client's new_id(): 8 hex digits, '-', 24 hex digits.
std::string new_id();

// Lowercase hex of `n` random bytes from the OS CSPRNG.
std::string random_hex(std::size_t n);

}  // namespace pxf
