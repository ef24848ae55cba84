#pragma once
// Heap policy for processes that relay large messages (pxcontroller, pxengine).
//
// glibc returns large freed blocks to the kernel at once (an mmap per block of 128 KiB-32 MiB,
// a trimmed heap top above that), so every next 10 MB message lands in fresh pages: on a VM
// each first touch is a page fault (about 2 µs per 4 KiB here) and each unmap a TLB shootdown
// across the process's threads. keep_freed_memory() makes glibc keep freed memory for reuse
// (one heap, no mmap'd blocks, no automatic trimming); trim_heap() gives it back, which the
// processes do after a quiet spell.
//
// A user's own MALLOC_* / GLIBC_TUNABLES settings win; PXF_KEEP_FREED_MEMORY=0 turns it off.
namespace pxf::memory {

// Call first thing in main(), before any thread exists. Returns whether it applied.
bool keep_freed_memory();

// Whether freed memory is being kept and enough of it (32 MiB) lies free to be worth a trim.
// Cheap enough for a once-a-second check, not for every message.
bool worth_trimming();

// malloc_trim(0): hand free heap pages back to the kernel.
void trim_heap();

}  // namespace pxf::memory
