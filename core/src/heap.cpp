#include "kvscope/core/heap.hpp"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace kvscope {

bool keep_freed_heap_memory() {
#if defined(__GLIBC__)
  if (kGlibcHeap) {
    // Setting either threshold also stops glibc from adjusting them itself.
    constexpr int kTrim = 1 << 30, kMmap = 32 << 20;
    return mallopt(M_TRIM_THRESHOLD, kTrim) == 1 && mallopt(M_MMAP_THRESHOLD, kMmap) == 1;
  }
#endif
  return false;
}

}  // namespace kvscope
