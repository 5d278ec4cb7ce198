// Kernels of the merge families: KVMerger's merge-set segmentation and
// Gaussian-kernel weights (the weighted sums themselves are CSR rows built by
// apply_ragged_plan), and WeightedKV's per-step attention of a prompt query
// over the current slots. fp32 compute over fp32/fp16/bf16 storage. The merge
// DECISIONS (protection, which edges merge, which slot is dropped) are the
// reference's (kvscope/reference/methods/kvmerger.hpp, weightedkv.hpp).
#pragma once

#include <cstdint>
#include <vector>

#include "kvscope/opt/cpu/scores.hpp"
#include "kvscope/opt/cpu/storage.hpp"

namespace kvscope::opt::cpu {

/// Merge sets of one kv head's T tokens: maximal runs joined by merge[j]
/// (edge j, j+1; T - 1 flags), singletons included. `begin` receives the run
/// starts plus T (sets + 1 entries), `pivot` each run's argmax of `score`
/// (lowest index on ties: ref::kvmerger_head_plan's rule).
void merge_runs(std::int64_t tokens, const char* merge, const float* score, std::vector<std::int64_t>& begin,
                std::vector<std::int64_t>& pivot);

enum class SigmaMode { kMeanDistance, kFixed, kLiteral };

/// KVMerger Eq. 4 weights (ref::kvmerger_weights) of every token of the runs
/// [begin[s], begin[s+1]) of one kv head's keys k_head ([T, d]) around their
/// pivots: w_i = g_i / sum g, g_i = gaussian_weight(|k_pivot - k_i|^2, sigma).
/// sigma per run: mean distance to the pivot over sqrt 2 (kMeanDistance), the
/// given `sigma` (kFixed), or Eq. 4's fixed point (kLiteral). Distances are
/// computed on the differences scaled by a power of two per run (exact), so
/// keys near fp32's underflow keep their weights. w: [T] (1 for singletons).
/// One run per thread. `keys_cached`: the calling thread has just read
/// k_head (KVMerger's cosines, one head per thread), so the rows are not
/// prefetched; from memory the hints gain ~30%, from cache they only compete
/// with the loads (~5% of KVMerger's prefill). The weights are the same.
template <class S>
void gaussian_merge_weights(const S* k_head, std::int64_t tokens, int head_dim, const std::int64_t* begin,
                            const std::int64_t* pivot, std::int64_t runs, SigmaMode mode, float sigma, float* w,
                            bool keys_cached = false);

/// KVMerger's plan coefficients from gaussian_merge_weights' fp32 weights:
/// each run [begin[s], begin[s+1]) renormalised in double, so that its
/// coef_k sum to 1 (and its coef_v to the run's size m when `scaled_values`)
/// to the plan checker's 1e-12, as the reference's do (the fp32 weights sum
/// to 1 only to ~1e-7). coef_k, coef_v: [begin[runs]]; count[s] = m.
void run_coefficients(const float* w, const std::int64_t* begin, std::int64_t runs, bool scaled_values,
                      double* coef_k, double* coef_v, std::int64_t* count);

/// WeightedKV's streaming prefill, in two steps. First, for a block of
/// prompt queries [t0, t0 + n), the pre-scaled logits of kv head `kv`'s GQA
/// group against the n_keys keys it may see (tokens keys[0..n_keys) of the
/// layer's K [kv_heads, tokens, d], read in place) by one GEMM:
/// out[(i * n + u) * n_keys + c] = q_{kv*G+i, t0+u} . k_{kv, keys[c]} / sqrt(d).
/// Serial (callers run one kv head per thread).
template <class S>
void group_block_logits(const LayerShape& s, const S* q, const S* k, const std::int64_t* keys, std::int64_t n_keys,
                        int kv, std::int64_t t0, std::int64_t n, float* out);

/// Then per query: the softmax of each of the G q heads over the first `len`
/// columns of its logit row (head i's row at rows + i * head_stride; a
/// column of a key the query may not see holds -inf and gets probability 0),
/// reduced over the group (sum, mean, max) into out[len]. The rows are
/// overwritten (exp). The caller reads its slots' columns from `out`: no
/// per-head gather of the slots' logits. Serial.
void group_prefix_softmax(float* rows, std::int64_t head_stride, int group, std::int64_t len, Reduce r, float* out);

}  // namespace kvscope::opt::cpu
