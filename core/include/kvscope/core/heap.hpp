// Process-wide heap setting for kvscope's executables (the CLI, the bench).
#pragma once

#include <cstdlib>  // defines __GLIBC__ on glibc

namespace kvscope {

/// Whether the heap is glibc's malloc (not a sanitizer's), which
/// keep_freed_heap_memory tunes.
#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__)
inline constexpr bool kGlibcHeap = true;
#else
inline constexpr bool kGlibcHeap = false;
#endif

/// Makes glibc's malloc keep freed memory for reuse instead of returning it to
/// the kernel: no trimming of the heap top below 1 GiB, and blocks up to
/// 32 MiB (the most glibc allows) from the heap rather than their own mmap.
/// Each layer's prefill allocates and frees megabytes of plans (48 bytes per
/// slot); with the default thresholds every layer faulted those pages in again,
/// which cost more than the selection itself (docs/performance.md, run 13).
/// Returns false where the heap is not glibc's (kGlibcHeap) or glibc refused;
/// the program then runs the same, only slower.
bool keep_freed_heap_memory();

}  // namespace kvscope
