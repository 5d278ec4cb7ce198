// Kernels of the evict-then-merge families: EMS's centre assignment (the
// O(rest x centres x d) part of a compression) and CaM's merge probabilities
// of a streamed prompt (the attention of every prompt query over its
// StreamingLLM cache). fp32 compute over fp32/fp16/bf16 storage; every output
// element is reduced by one thread in a fixed order. The DECISIONS (which
// tokens are centres, the merge share, the Bernoulli draws, the plan rows)
// are the reference's (kvscope/reference/methods/ems.hpp, cam.hpp); the
// weighted sums themselves are CSR rows built by apply_ragged_plan.
#pragma once

#include <cstdint>

#include "kvscope/opt/cpu/storage.hpp"

namespace kvscope::opt::cpu {

/// EMS assignment of one kv head (ref::ems_assign): for every rest item i
/// (rows rest[i] of k and v, [tokens, d]), its similarity to each centre
/// (rows centres[c], in position order): cos k, or cos k * cos v unless
/// `keys_only` (cosines of power-of-two-scaled rows, so tiny and huge rows keep
/// their direction; a zero row has cosine 0). Outputs per rest item:
/// any = the highest similarity to any centre; best / second = the highest and
/// runner-up over the centres with can_take[c]; centre = the best one's item
/// (the earliest on equal similarity), or -1 (the zero class) when none can
/// take members or best < tau. -INFINITY where there is no such centre.
/// Blocks of 64 rest items per thread, each block's similarities by one GEMM.
template <class S>
void centre_assignment(const S* k, const S* v, int head_dim, const std::int64_t* rest, std::int64_t n_rest,
                       const std::int64_t* centres, std::int64_t n_centres, const char* can_take, bool keys_only,
                       float tau, float* best, float* second, std::int64_t* centre, float* any);

enum class CamAttention { kCumulative, kDecode, kStep };

/// CaM's simulated prefill (ref::cam_stream): prompt token t arrives, the
/// cache keeps `sinks` + the most recent budget - sinks tokens (eviction by
/// position; keys never change), then query t attends over the cache. For
/// every token e evicted at step t >= budget (e = t - (budget - sinks)):
/// p[e] = cam_merge_probability(A_e, denom) with A the attention of the queries
/// before t over their caches, mean over each kv head's GQA group (kCumulative:
/// summed; kStep: the last query's only; kDecode: none), denom the mean of A
/// over the next min(width, budget - sinks) tokens (denom_max: the max over the
/// cache and e). out: [kv_heads, T], 0 for tokens never evicted.
/// Query rows in parallel, Ā folded serially in query order.
template <class S>
void cam_merge_probabilities(const LayerShape& s, const S* q, const S* k, std::int64_t sinks, std::int64_t budget,
                             std::int64_t width, bool denom_max, CamAttention attention, float* out);

}  // namespace kvscope::opt::cpu
