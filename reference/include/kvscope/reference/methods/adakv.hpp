// AdaKV (Feng et al., arXiv 2407.11550, "Ada-KV: Optimizing KV Cache Eviction
// by Adaptive Budget Allocation"): a wrapper over any score-then-top-k method
// that shares the layer's H·B past slots among its kv heads by a global top-k
// of the heads' scores, with a per-head floor, instead of B per head. The
// base's protected tokens (SnapKV's window) are kept in every head.
// docs/algorithms/adakv.md lists presets, sources and reconstructed choices.
#pragma once

#include <cstdint>
#include <vector>

#include "kvscope/core/for_each.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scorer.hpp"

namespace kvscope::ref {

enum class AdaAllocation {
  kOriginal,  // FFY0/AdaKV and KVCache-Factory: B_h = round(c_h (1 - alpha) + floor(alpha B))
  kKvpress,   // kvpress AdaKVPress: top-n_safe per head protected, global bottom pruning
};

struct AdaKVOptions {
  double alpha = 0.2;      // floor fraction (alpha_safeguard in kvpress)
  bool normalize = true;   // original only: scale head h by sum(top-B s_h) / sum(s_h)
  AdaAllocation allocation = AdaAllocation::kOriginal;
};

/// Per-head budgets (protected tokens included) for a layer of T tokens at
/// nominal budget C per head, from the base's scores. A budget covering the
/// prompt (C >= T) or leaving no past slots gives every head C.
/// Σ_h budgets = H·C exactly (kKvpress) or within ±H (kOriginal). kOriginal sorts each head's
/// scores through `for_each_head` (a backend's threads; empty: in turn).
std::vector<std::int64_t> adakv_budgets(const LayerScores& scores, std::int64_t T, std::int64_t C,
                                        const AdaKVOptions& o, const ForEachIndex& for_each_head = {});

/// The original rounding: B_h = round_half_even(c_h (1 - alpha) + floor(alpha B))
/// from the global top-(H·B) counts c_h (Σ c_h = H·B). The floor loses up to
/// H·frac(alpha B) tokens on top of rounding, which can exceed the ±H the
/// head-shared law allows (e.g. H = 5, B = 14, c = 8,13,18,13,18 gives 64 of
/// 70); then the heads with the largest rounding remainders (lower head first)
/// get one token back until the sum is within H·B ± H. `cap` bounds each head.
std::vector<std::int64_t> adakv_round_budgets(const std::vector<std::int64_t>& counts, std::int64_t B, double alpha,
                                              std::int64_t cap);

/// The wrapped method (parameter 'base', '/' standing for ':') and the allocation options.
MethodSpec adakv_base(const Params& p);
AdaKVOptions adakv_options(const Params& p);

FamilyInfo adakv_family();

}  // namespace kvscope::ref
