// CaM, Cache Merging (Zhang et al., ICML 2024, "CaM: Cache Merging for Memory-
// efficient LLMs Inference", PMLR 235:58840): a base eviction (StreamingLLM
// start + recent) picks the token i to evict; instead of dropping V_i, it is
// handed to the next m kept tokens W_i, V_j += M_i V_i / m, with the merge mask
// M_i ~ Bernoulli(p_i), p_i = clamp(Ā_i / denom(W_i), 0, 1). Keys are never
// modified. The draws come from a counter-based stream keyed by (seed, layer,
// kv head, evicted token), so every run and every backend sees the same draws.
// docs/algorithms/cam.md lists parameters, presets and reconstructed choices.
#pragma once

#include <cstdint>

#include "kvscope/reference/registry.hpp"

namespace kvscope::ref {

FamilyInfo cam_family();

/// The uniform in [0, 1) that gates the merge of `token` in (layer, kv head):
/// M = (u < p). SplitMix64 of the four integers; stable across runs and platforms.
double cam_uniform(std::uint64_t seed, int layer, int kv_head, std::int64_t token);

}  // namespace kvscope::ref
