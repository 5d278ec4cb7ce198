// keep_freed_heap_memory: a second round of the same allocations takes no new
// pages from the kernel. Page faults are counted with getrusage.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <cstring>
#include <memory>
#include <vector>

#include "kvscope/core/heap.hpp"

namespace {

long minor_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

/// 32 MiB in blocks of a plan's sizes (64 KiB: 8192 slots of 8 bytes) and of
/// long prompts' (1 MiB), each written, then all freed: what a layer's
/// prefill does with its plans.
void allocate_touch_free() {
  std::vector<std::unique_ptr<char[]>> blocks;
  for (int i = 0; i < 256; ++i) blocks.emplace_back(new char[64 << 10]);
  for (int i = 0; i < 16; ++i) blocks.emplace_back(new char[1 << 20]);
  for (std::size_t i = 0; i < blocks.size(); ++i) std::memset(blocks[i].get(), 1, i < 256 ? 64 << 10 : 1 << 20);
}

}  // namespace

TEST(Heap, KeptMemoryIsReusedWithoutPageFaults) {
  if (!kvscope::kGlibcHeap) GTEST_SKIP() << "keep_freed_heap_memory tunes glibc's malloc; this build's heap is another";
  ASSERT_TRUE(kvscope::keep_freed_heap_memory());
  allocate_touch_free();  // the pages are taken once
  const long before = minor_faults();
  for (int round = 0; round < 4; ++round) allocate_touch_free();
  // 4 rounds of 32 MiB are 32768 pages; with the default thresholds every
  // round faults most of them in again.
  EXPECT_LT(minor_faults() - before, 512);
}
