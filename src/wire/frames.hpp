#pragma once
// A multipart ZeroMQ message as a list of frames. Frames are moved, never copied.
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace pxf::wire {

using Frames = std::vector<zmq::message_t>;

inline std::string_view view(const zmq::message_t& m) { return {static_cast<const char*>(m.data()), m.size()}; }
inline zmq::message_t frame(std::string_view s) { return zmq::message_t(s.data(), s.size()); }
// A byte copy, for small frames such as routing identities.
inline zmq::message_t clone(const zmq::message_t& m) { return zmq::message_t(m.data(), m.size()); }

// The frame that separates routing identities from the signed message.
inline constexpr std::string_view kDelimiter = "<IDS|MSG>";

}  // namespace pxf::wire
