// Storage element types of the CPU kernels: float, Eigen::half (IEEE fp16) and
// Eigen::bfloat16, all converted to fp32 for compute (Eigen's conversions use
// F16C when the compiler targets it). `dispatch_storage` turns a runtime DType
// into the template argument.
#pragma once

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>

#include "kvscope/core/dtype.hpp"
#include "kvscope/core/kernel_types.hpp"

namespace kvscope::opt::cpu {

using f16 = Eigen::half;
using bf16 = Eigen::bfloat16;

template <class S>
inline float to_f32(S x) {
  return static_cast<float>(x);
}
template <class S>
inline S from_f32(float x) {
  return static_cast<S>(x);
}

/// Converts n storage elements to fp32 (exact for every dtype). Out of line in
/// src/storage.cpp, built with the kernels' ISA flags: F16C's vcvtph2ps for
/// fp16, a 16-bit shift for bf16, and one definition for every caller.
void load_row(const float* src, std::int64_t n, float* dst);
void load_row(const f16* src, std::int64_t n, float* dst);
void load_row(const bf16* src, std::int64_t n, float* dst);

/// Converts n fp32 values to storage, bit-identical to from_f32<S> on every
/// input (round to nearest even; NaN becomes Eigen's quiet NaN with the sign
/// kept). Vectorised: F16C's vcvtps2ph for fp16, integer rounding for bf16.
void store_row(const float* src, std::int64_t n, float* dst);
void store_row(const float* src, std::int64_t n, f16* dst);
void store_row(const float* src, std::int64_t n, bf16* dst);

/// Calls f(S{}) with the storage type of `t`.
template <class F>
decltype(auto) dispatch_storage(DType t, F&& f) {
  switch (t) {
    case DType::kF16: return f(f16{});
    case DType::kBF16: return f(bf16{});
    case DType::kF32: break;
  }
  return f(float{});
}

using kern::LayerShape;

/// Bytes a streaming kernel hints ahead of the row it converts: this VM's
/// hardware prefetcher alone left the K-streaming kernels at a third of the
/// copy bandwidth (docs/performance.md, run 4).
inline constexpr std::size_t kPrefetchAhead = 2048;

/// Hints the `bytes` at p into the cache, one line at a time. A hint never
/// faults, so it may run past the end of a buffer.
inline void prefetch(const void* p, std::size_t bytes) {
  for (std::size_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
}

/// prefetch() with the low-locality hint (prefetcht2), for rows needed a
/// block later (decode hints the next block's K and V rows two at a time
/// between its products: 1.2 -> 0.75-0.8 ms against one burst of 256 lines
/// per block, and 0.9-1.1 ms with the default hint; docs/performance.md,
/// run 9). The streaming kernels' kPrefetchAhead hints lost 0-20% with it.
inline void prefetch_block(const void* p, std::size_t bytes) {
  for (std::size_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b, 0, 1);
}

/// Copies `bytes` from src to dst with non-temporal (streaming) stores when dst
/// is 16-byte aligned and `bytes` a multiple of 16, else by memcpy. For
/// outputs written once and not read back soon (the compressed cache): a
/// regular store first reads each line for ownership, 1.5x a copy's traffic.
/// Same bytes either way; call stream_fence() before another thread reads dst.
void stream_copy(void* dst, const void* src, std::size_t bytes);
/// Orders this thread's streaming stores before what follows (sfence).
void stream_fence();

/// fp32 dot product; `omp simd` lets the compiler vectorise the reduction in
/// a fixed order (the same result on every run and thread count).
inline float dot(const float* a, const float* b, int n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

}  // namespace kvscope::opt::cpu
