#include "util/memory.hpp"

#include <malloc.h>

#include <cstdlib>
#include <cstring>

extern char** environ;

namespace pxf::memory {
namespace {
bool g_keeping = false;
constexpr int kTopPad = 64 << 20;  // the heap grows in steps this large

bool user_tuned_malloc() {
  for (char** e = environ; e && *e; ++e)
    if (std::strncmp(*e, "MALLOC_", 7) == 0 || std::strncmp(*e, "GLIBC_TUNABLES=", 15) == 0) return true;
  return false;
}
}  // namespace

bool keep_freed_memory() {
  const char* off = std::getenv("PXF_KEEP_FREED_MEMORY");
  if ((off && std::strcmp(off, "0") == 0) || user_tuned_malloc()) return false;
  // One arena: a block freed by another thread (frames received on ZeroMQ's I/O thread are
  // freed on the event loop's) goes back where the next receive looks for memory.
  mallopt(M_ARENA_MAX, 1);
  mallopt(M_MMAP_MAX, 0);              // large blocks from the heap, reused after free
  mallopt(M_TRIM_THRESHOLD, 1 << 30);  // keep up to 1 GiB of free heap top
  mallopt(M_TOP_PAD, kTopPad);         // grow the heap in 64 MiB steps
  g_keeping = true;
  return true;
}

bool worth_trimming() { return g_keeping && mallinfo2().fordblks >= (std::size_t{32} << 20); }

void trim_heap() { ::malloc_trim(0); }

}  // namespace pxf::memory
