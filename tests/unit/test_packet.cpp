// mpi/packet.hpp: frames <-> one contiguous MPI buffer (header-only, no MPI needed).
#include "mpi/packet.hpp"

#include <gtest/gtest.h>

#include <memory>
#include <string>

namespace {

using pxf::mpi::kShareFrameBytes;
using pxf::mpi::pack_frames;
using pxf::mpi::Packet;
using pxf::mpi::unpack_frames;
using pxf::wire::frame;
using pxf::wire::Frames;
using pxf::wire::view;

Frames sample() {
  Frames f;
  f.push_back(frame("mux"));
  f.push_back(frame(""));
  f.push_back(frame(std::string(kShareFrameBytes, 'b')));
  f.push_back(frame(std::string(kShareFrameBytes - 1, 's')));
  return f;
}

TEST(Packet, RoundTripsEveryFrame) {
  Frames in = sample();
  Packet p = pack_frames(in);
  Frames out = unpack_frames(p.data(), p.size());
  ASSERT_EQ(out.size(), in.size());
  for (std::size_t i = 0; i < in.size(); ++i) EXPECT_EQ(view(out[i]), view(in[i])) << i;
}

TEST(Packet, LargeFramesShareTheReceivedBufferAndKeepItAlive) {
  auto packet = std::make_shared<Packet>(pack_frames(sample()));
  const char* base = packet->data();
  Frames out = unpack_frames(packet);
  ASSERT_EQ(out.size(), 4u);
  auto inside = [&](const zmq::message_t& m) {
    auto* d = static_cast<const char*>(m.data());
    return d >= base && d < base + packet->size();
  };
  EXPECT_TRUE(inside(out[2]));   // large: points into the packet
  EXPECT_FALSE(inside(out[3]));  // below the threshold: copied
  EXPECT_FALSE(inside(out[0]));
  std::weak_ptr<Packet> weak = packet;
  packet.reset();
  EXPECT_FALSE(weak.expired());  // the frame holds it
  EXPECT_EQ(view(out[2]), std::string(kShareFrameBytes, 'b'));
  out.clear();
  EXPECT_TRUE(weak.expired());
}

TEST(Packet, BulkFramesLeaveThePacketAndComeBackAllocatedInOrder) {
  Frames in = sample();
  Packet p = pack_frames(in, kShareFrameBytes);  // frame 2 is bulk, 3 (one byte less) is not
  EXPECT_EQ(p.size(), 4 + 8 * in.size() + 3 + 0 + (kShareFrameBytes - 1));
  EXPECT_THROW(unpack_frames(p.data(), p.size()), std::runtime_error);  // bulk needs a caller that fetches it
  std::vector<std::size_t> bulk;
  Frames out = unpack_frames(p.data(), p.size(), nullptr, &bulk);
  ASSERT_EQ(bulk, std::vector<std::size_t>{2});
  ASSERT_EQ(out.size(), in.size());
  EXPECT_EQ(out[2].size(), kShareFrameBytes);  // allocated for the bulk receive
  for (std::size_t i : {0, 1, 3}) EXPECT_EQ(view(out[i]), view(in[i])) << i;
}

TEST(Packet, RejectsTruncatedAndLyingPackets) {
  Packet p = pack_frames(sample());
  EXPECT_THROW(unpack_frames(p.data(), 3), std::runtime_error);
  EXPECT_THROW(unpack_frames(p.data(), p.size() - 1), std::runtime_error);
  Packet lie = p;
  std::uint32_t n = 1000000;
  std::memcpy(lie.data(), &n, 4);
  EXPECT_THROW(unpack_frames(lie.data(), lie.size()), std::runtime_error);
}

}  // namespace
