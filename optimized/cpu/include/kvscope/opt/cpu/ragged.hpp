// The compressed cache in varlen layout: every kv head's slots stored back to
// back, head h at rows [offsets[h], offsets[h+1]). One kernel builds it from a
// plan in CSR form (slot i = sum_j coef[i,j] * row_j): eviction (one-hot rows),
// ragged compaction, Gaussian-weighted and neighbour merges and centre scatter
// are all this gather-and-weight with different coefficients. A second kernel
// is the consumer: single-query decode attention over the ragged cache.
#pragma once

#include <cstdint>

#include "kvscope/opt/cpu/storage.hpp"

namespace kvscope::opt::cpu {

using kern::RaggedPlan;  // core/kernel_types.hpp

/// K'/V' rows of every slot from k, v ([heads, tokens, d]); fp32 accumulation,
/// one rounding to S on store. k_out, v_out: [offsets[heads], d].
template <class S>
void apply_ragged_plan(const RaggedPlan& plan, const S* k, const S* v, std::int64_t tokens, int head_dim, S* k_out,
                       S* v_out);

/// o_h = softmax(q_h K'^T / sqrt(d) + bias) V' for every q head over its kv
/// head's slots: online softmax over fixed-size chunks of slots (each kv
/// head's K'/V' read once for its G q heads), chunks merged in order, so the
/// result is the same for every thread count. q: [q_heads, d] fp32;
/// log_bias (nullable): per slot, added to the logit (log-count for merged
/// slots). out: [q_heads, d].
template <class S>
void decode_attention(const float* q, int q_heads, int kv_heads, int head_dim, const std::int64_t* offsets,
                      const S* k, const S* v, const float* log_bias, float* out);

}  // namespace kvscope::opt::cpu
