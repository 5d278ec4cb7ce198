// Internal building blocks of the attention-shaped kernels (window scores,
// accumulated attention, the streaming prefills): Q.K^T tiles and a
// vectorised softmax. Every result is a function of the values only, never of
// buffer addresses, tile positions or thread counts: under AVX2 each logit is
// one FMA chain over d in order (an outer-product register tile over keys
// transposed 16 at a time; without AVX2, one dot8 per logit), exp goes
// through glibc's vector expf lane by lane, and the max and sum use eight
// fixed accumulators.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "kvscope/opt/cpu/storage.hpp"

namespace kvscope::opt::cpu::detail {

/// Keys per GEMM block. Fixed (never derived from the thread count), so the
/// blocks, and so every logit, are the same on any number of threads.
inline constexpr std::int64_t kKeyBlock = 256;

/// n floats of the calling thread's scratch buffer, uninitialised. The buffer
/// only grows and lives as long as the thread, so kernels called once per
/// layer do not fault in and zero megabytes each time. One user per thread at
/// a time: a kernel takes it once, outside its parallel region.
inline float* thread_scratch(std::size_t n) {
  thread_local std::unique_ptr<float[]> buffer;
  thread_local std::size_t size = 0;
  if (size < n) {
    buffer = std::make_unique_for_overwrite<float[]>(n);
    size = n;
  }
  return buffer.get();
}

/// Rows [first, first + n) of head h of a [heads, tokens, d] buffer as fp32, times `scale`.
template <class S>
void load_rows(const S* x, std::int64_t h, std::int64_t tokens, int d, std::int64_t first, std::int64_t n, float scale,
               float* out) {
  load_row(x + (h * tokens + first) * d, n * d, out);
  if (scale != 1.0f)
    for (std::int64_t e = 0; e < n * d; ++e) out[e] *= scale;
}

/// logits[R, n] (row stride ld) = Q[R, d] . K[n, d]^T, single-threaded
/// (callers parallelise over fixed blocks). ~86% of one core's FMA peak at
/// d = 128 against ~70% for Eigen's GEMM (bench: kernel/group_block_logits, flop_ratio).
/// K may be storage (fp16, bf16): each 16-key tile is converted while it is
/// transposed, so a caller that reads K once needs no fp32 copy of it (the
/// copy's pass was 18% of window_scores at window 8). The logits are the
/// same bits for every storage type holding the same values.
template <class S>
void gemm_qkt(const float* Q, std::int64_t R, const S* K, std::int64_t n, int d, float* logits, std::int64_t ld);

/// The same against the gathered keys K + rows[v] * d, v < n (rows may
/// repeat or go in any order; nullptr: contiguous), read in place: a caller
/// with a subset of the keys copies none of them.
template <class S>
void gemm_qkt_rows(const float* Q, std::int64_t R, const S* K, const std::int64_t* rows, std::int64_t n, int d,
                   float* logits, std::int64_t ld);

/// In place: x <- exp(x) over n entries, eight lanes at a time (tail included)
/// through glibc's vector expf, so each result depends on its input only.
void exp_inplace(float* x, std::int64_t n);

/// max of x[0..n) (-inf for n <= 0) with eight fixed accumulators.
float max_of(const float* x, std::int64_t n);

/// In place: x <- exp(x - m) over n entries; returns their sum, eight lanes
/// summed in a fixed order (0 for n <= 0).
float exp_shifted_sum(float* x, std::int64_t n, float m);

/// In place: x <- exp(x - max x) over len entries; returns 1 / their sum (0
/// for len <= 0), so softmax(x) = x * the result. Lets a consumer fold the
/// normalisation into its own pass over the row instead of a pass of its own.
float softmax_unnormalised(float* x, std::int64_t len);

}  // namespace kvscope::opt::cpu::detail
