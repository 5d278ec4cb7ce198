// Shared scoring machinery of the eviction baselines (ALGORITHMS.md "Required
// shared machinery"), one implementation each: window attention scores,
// accumulated attention, 1-D pooling with PyTorch's edge semantics, GQA group
// reduction, and top-k with a documented tie rule and reported margins.
#pragma once

#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "kvscope/reference/attention.hpp"
#include "kvscope/reference/method.hpp"

namespace kvscope::ref {

enum class Reduce { kSum, kMean, kMax };
enum class Pool { kNone, kAvg, kMax };

/// Parses "sum" | "mean" | "max" and "none" | "avg" | "max" (names as in the
/// method parameters); anything else is Error(kUsage) naming `param`.
Reduce parse_reduce(const std::string& text, const std::string& param);
Pool parse_pool(const std::string& text, const std::string& param);

/// Softmax rows of the last `window` queries of Q ([T x d]) over all T keys,
/// causal inside the window (query T-w+i sees keys 0..T-w+i): [w x T].
/// `window` is clamped to T.
MatX window_attention(const MatX& Q, const MatX& K, std::int64_t window);

/// Per-key window score, the sum or mean over the window rows (SnapKV eq. 1):
/// length T; keys inside the window get scores too (callers exclude them).
VecX window_scores(const MatX& Q, const MatX& K, std::int64_t window, Reduce rows);

/// Accumulated attention per key of q head h over all T prefill queries (H2O):
/// the trace's `prefill/attn_colsum` when recorded, else computed. With
/// `per_query`, column j is divided by the T - j queries that can see it
/// (kvpress ObservedAttentionPress).
VecX accumulated_attention(const LayerInput& in, int q_head, bool per_query);

/// 1-D pooling, stride 1, padding kernel/2, output length = input length, as
/// torch avg_pool1d (count_include_pad=True: edge windows divide by `kernel`,
/// zeros padded) and max_pool1d (padding never wins). `kernel` must be odd;
/// a kernel longer than the input is fine. kNone or kernel 1 returns x.
VecX pool1d(const VecX& x, std::int64_t kernel, Pool pool);

/// Reduces the score vectors of the q heads that read kv head `kv_head`.
VecX group_reduce(const std::vector<VecX>& per_q_head, int kv_head, int q_heads, int kv_heads, Reduce r);

/// Result of a top-k selection.
struct Selection {
  std::vector<std::int64_t> kept;  // ascending original index
  /// min kept score - max evicted score over the candidates: the decision
  /// margin (+inf when nothing was evicted or nothing kept). 0 means a tie
  /// decided by the tie rule.
  double margin = std::numeric_limits<double>::infinity();
  /// Evicted candidates whose score equals the smallest kept score.
  std::int64_t ties = 0;
};

/// The k best `candidates` by `scores` (indexed by original token): higher
/// score first; equal scores keep the lower index first (torch.topk's
/// behaviour on CPU, and the one the kvpress #226 fix relies on). k is clamped
/// to the candidate count. A NaN score is Error(kBadNumber) naming the token.
Selection top_k(const VecX& scores, std::span<const std::int64_t> candidates, std::int64_t k);

/// [begin, end) as a candidate list.
std::vector<std::int64_t> index_range(std::int64_t begin, std::int64_t end);

/// Tokens 0..n-1 not in `excluded` (any order, indices < n), ascending: the
/// candidates left once protected tokens are set aside.
std::vector<std::int64_t> complement(std::int64_t n, std::span<const std::int64_t> excluded);

/// Sorted union of two index sets (kept selection plus protected tokens).
std::vector<std::int64_t> merge_sorted(std::span<const std::int64_t> a, std::span<const std::int64_t> b);

}  // namespace kvscope::ref
