// Score kernels of the eviction methods, fp32 compute over fp32/fp16/bf16
// storage, multi-threaded (OpenMP). Each output element is reduced by one
// thread in a fixed order, so results are bitwise identical for any thread
// count. Reference counterparts: kvscope/reference/scores.hpp.
#pragma once

#include <cstdint>

#include "kvscope/opt/cpu/storage.hpp"

namespace kvscope::opt::cpu {

using kern::Pool;
using kern::Reduce;

/// Per q head h and key j: the sum / mean / max over the last `window` queries
/// (clamped to T) of softmax(q_i . k_j / sqrt(d)), causal inside the window.
/// GQA: every q head of a group is scored in one pass over its kv head's keys.
/// out: [q_heads, T] (keys no window query sees score 0).
template <class S>
void window_scores(const LayerShape& s, const S* q, const S* k, std::int64_t window, Reduce rows, float* out);

/// Accumulated attention of every q head over all T causal prefill queries
/// (column sums of the attention matrix; H2O). With `per_query`, column j is
/// divided by the T - j queries that see it. out: [q_heads, T].
template <class S>
void accumulated_attention(const LayerShape& s, const S* q, const S* k, bool per_query, float* out);

/// Negative L2 norm of every key (KNorm keeps the smallest norms). out: [kv_heads, T].
template <class S>
void key_norm_scores(const LayerShape& s, const S* k, float* out);

/// torch avg_pool1d / max_pool1d, stride 1, padding kernel/2 (zeros counted in
/// the average, never winning the max), output length n. kernel odd.
void pool1d(const float* x, std::int64_t n, std::int64_t kernel, Pool pool, float* y);

/// pool1d of `rows` rows in parallel: row r reads x + r * x_stride, writes
/// y + r * y_stride (n entries each; the rows must not overlap). Every q
/// head's window scores at once, one row per thread at a time.
void pool1d_rows(const float* x, std::int64_t x_stride, std::int64_t rows, std::int64_t n, std::int64_t kernel, Pool pool,
                 float* y, std::int64_t y_stride);

/// Reduces the scores of each GQA group's q heads: in [q_heads, n] -> out [kv_heads, n].
void group_reduce(const float* in, int q_heads, int kv_heads, std::int64_t n, Reduce r, float* out);

}  // namespace kvscope::opt::cpu
