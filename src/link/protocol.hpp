#pragma once
// The fabric link's vocabulary (docs/fabric-link.md), used by both ends: the controller
// (src/controller/job_link.cpp) and a job's gateway on rank 0 (gateway/, mpi/).
// Change a string here and the wire changes: both ends and the document go together.
//
// Character arrays, so each name is usable as a const char*, a std::string_view and in
// comparisons with std::string alike.
namespace pxf::link {

// --- channels: the frame after the routing id of every message on the link
inline constexpr char kLinkChannel[] = "link";                       // link control messages (below)
inline constexpr char kMuxChannel[] = "mux";                         // direct requests and replies
inline constexpr char kControlChannel[] = "control";                 // control requests and replies
inline constexpr char kTaskChannel[] = "task";                       // load-balanced tasks and replies
inline constexpr char kIopubChannel[] = "iopub";                     // engine output, gateway -> controller
inline constexpr char kBcastChannel[] = "bcast";                     // one broadcast request per job; per-rank replies
inline constexpr char kBcastCoalescedChannel[] = "bcast_coalesced";  // a job's coalesced broadcast reply

// Routing id suffix of a job's heart thread: its second connection is "<job uuid>/hb".
inline constexpr char kHeartSuffix[] = "/hb";

// --- link control messages (on kLinkChannel)
inline constexpr char kRegisterRequest[] = "pxf_register_request";  // gateway -> controller
inline constexpr char kRegisterReply[] = "pxf_register_reply";
inline constexpr char kHeartbeat[] = "pxf_heartbeat";  // heart thread -> controller
inline constexpr char kHeartbeatReply[] = "pxf_heartbeat_reply";
inline constexpr char kUnregister[] = "pxf_unregister";  // gateway -> controller
inline constexpr char kProbe[] = "pxf_probe";            // controller -> gateway
inline constexpr char kShutdown[] = "pxf_shutdown";      // controller -> gateway

// --- pxfabric's own messages on stock channels
inline constexpr char kWhereRequest[] = "pxf_where_request";  // control channel, answered by a rank's watch thread
inline constexpr char kWhereReply[] = "pxf_where_reply";
// Hub queries on the registration socket (clients, pxcluster; not on the link).
inline constexpr char kStatsRequest[] = "pxf_stats_request";  // counters, drops, sizes
inline constexpr char kStatsReply[] = "pxf_stats_reply";
inline constexpr char kEnginesRequest[] = "pxf_engines_request";  // registered engines and where they run
inline constexpr char kEnginesReply[] = "pxf_engines_reply";

// --- the gateway's internal channels, between ranks and rank 0 over MPI (never on the link)
inline constexpr char kPartChannel[] = "pxf_part";           // [ch, bcast key, uuid, msg...]
inline constexpr char kRankDownChannel[] = "pxf_rank_down";  // [ch, rank]

}  // namespace pxf::link
