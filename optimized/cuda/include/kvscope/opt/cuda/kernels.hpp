// CUDA kernels of the optimized backend: the operations and contracts of
// optimized/cpu (same names, same semantics, same per-element math from
// core/kernel_math.hpp), fp32 compute over fp32/fp16/bf16 device storage.
// Framework-free, as FlashInfer's kernel headers: raw device pointers, shapes
// and a stream; no CUDA header is needed to call them (the storage dtype is a
// runtime DType and storage pointers are void*). Every output element is
// reduced by one thread, or by one block in a fixed tree, so results are
// bitwise identical from run to run. Errors are Error(kInternal) naming the
// CUDA call. Scratch memory is stream-ordered (cudaMallocAsync).
#pragma once

#include <cstdint>

#include "kvscope/core/dtype_kind.hpp"
#include "kvscope/core/kernel_types.hpp"

struct CUstream_st;  // the CUDA runtime's stream type (cudaStream_t = CUstream_st*), at global scope as there

namespace kvscope::opt::cuda {

using kern::LayerShape;
using kern::Pool;
using kern::RaggedPlan;
using kern::Reduce;
/// cudaStream_t without the CUDA headers (nullptr: the default stream).
using Stream = ::CUstream_st*;

/// cpu::window_scores: per q head h and key j, the sum / mean / max over the
/// last `window` queries of softmax(q_i . k_j / sqrt(d)), causal. out [q_heads, T].
void window_scores(const LayerShape& s, DType dtype, const void* q, const void* k, std::int64_t window, Reduce rows,
                   float* out, Stream stream = nullptr);

/// cpu::accumulated_attention: column sums of every q head's causal attention
/// matrix over all T prefill queries (÷ (T - j) with `per_query`). out [q_heads, T].
void accumulated_attention(const LayerShape& s, DType dtype, const void* q, const void* k, bool per_query, float* out,
                           Stream stream = nullptr);

/// cpu::key_norm_scores: -||k_j|| of every key. out [kv_heads, T].
void key_norm_scores(const LayerShape& s, DType dtype, const void* k, float* out, Stream stream = nullptr);

/// cpu::pool1d on each of `rows` rows of length n (torch avg/max_pool1d, stride 1, padding kernel/2).
void pool1d(const float* x, int rows, std::int64_t n, std::int64_t kernel, Pool pool, float* y,
            Stream stream = nullptr);

/// cpu::group_reduce: [q_heads, n] -> [kv_heads, n] by sum / mean / max over each GQA group.
void group_reduce(const float* in, int q_heads, int kv_heads, std::int64_t n, Reduce r, float* out,
                  Stream stream = nullptr);

/// Segmented top-k (cpu::top_k per row): for each of `rows` rows of n scores,
/// kept[row, j] = 1 for the k[row] best candidates (candidate[row, j] != 0;
/// nullptr: every token), higher score first, equal scores to the lower index;
/// 0 elsewhere. One block per row, an exact radix select on (score, index).
/// k: device array [rows]. Scores must not be NaN.
void top_k_mask(const float* scores, const std::uint8_t* candidate, int rows, std::int64_t n, const std::int64_t* k,
                std::uint8_t* kept, Stream stream = nullptr);

/// cpu::adjacent_key_cosine: cos(k_j, k_{j+1}) per kv head. out [kv_heads, T - 1].
void adjacent_key_cosine(const LayerShape& s, DType dtype, const void* k, float* out, Stream stream = nullptr);

/// Merge-set segmentation by scan: per row of n - 1 adjacent similarities,
/// token j + 1 joins token j's set when sim[j] > threshold. segment[row, j] is
/// the index of token j's set's first token. One block per row (scan in tiles).
void merge_segments(const float* sim, int rows, std::int64_t n, float threshold, std::int64_t* segment,
                    Stream stream = nullptr);

/// cpu::apply_ragged_plan: every slot's K'/V' row as the plan's weighted sum of
/// token rows (fp32 accumulation, optional RoPE re-rotation, one rounding on
/// store): eviction, compaction, Gaussian and neighbour merges and centre
/// scatter are all this kernel. The plan's arrays are device memory; `slots`
/// = plan.offsets[plan.heads] (the caller sized k_out by it; passing it saves
/// a device-to-host read and a sync). One thread per slot and pair of 16-byte
/// pieces (i, i + d/2), so each RoPE pair stays in one thread.
void apply_ragged_plan(const RaggedPlan& plan, std::int64_t slots, DType dtype, const void* k, const void* v,
                       std::int64_t tokens, int head_dim, void* k_out, void* v_out, Stream stream = nullptr);

/// cpu::decode_attention: one query per q head over its kv head's ragged
/// slots (offsets: device [kv_heads + 1], total_slots = offsets[kv_heads]),
/// optional per-slot log bias. q [q_heads, d] fp32, out [q_heads, d].
/// Flash-decoding: a block per chunk of 128 slots attends it for the G q heads
/// sharing the kv head (K'/V' read once), then a merge of each q head's chunks
/// in chunk order. A kv head with no slots gives zeros.
void decode_attention(const float* q, int q_heads, int kv_heads, int head_dim, const std::int64_t* offsets,
                      std::int64_t total_slots, DType dtype, const void* k, const void* v, const float* log_bias,
                      float* out, Stream stream = nullptr);

}  // namespace kvscope::opt::cuda
