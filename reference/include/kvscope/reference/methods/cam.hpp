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
#include <vector>

#include "kvscope/core/plan.hpp"

#include "kvscope/reference/registry.hpp"

namespace kvscope::ref {

enum class CamGate { kBernoulli, kAlways, kNever };
enum class CamDenominator { kMean, kMax };
enum class CamScore { kCumulative, kDecode, kStep };
enum class CamPrefill { kSimulate, kEvict, kNone };

struct CamConfig {
  std::int64_t sinks = 4;
  std::int64_t window = 16;  // m; 0 = the recent band (B - sinks), lm_eval's merge_budget = recent_budget
  std::int64_t interval = 1;
  CamGate gate = CamGate::kBernoulli;
  std::uint64_t seed = 0;
  CamDenominator denominator = CamDenominator::kMean;
  CamScore score = CamScore::kCumulative;
  CamPrefill prefill = CamPrefill::kSimulate;
  bool rescale = false;  // truncated window: divide by its actual size (kvpress) instead of m (paper code)
};

/// The family's parameters resolved (Error(kUsage) on bad values).
CamConfig cam_config(const Params& p);
/// Error(kImpossibleBudget) unless budget >= sinks + 1 (room for the arriving token).
void cam_check_budget(const CamConfig& c, std::int64_t budget);

/// One kv head's simulated prefill (prefill=simulate) given, per prompt token,
/// the merge probability p it had when evicted (a backend's kernel computes
/// them; the reference from Ā in double): StreamingLLM's position-only
/// eviction, the gate u < p with u = cam_uniform, and the value hand-offs.
/// `margin` is the smallest |u - p| of the draws (+inf when none).
struct CamStream {
  Plan plan;
  double margin = 0;
};
CamStream cam_stream(const CamConfig& c, std::int64_t T, std::int64_t budget, int layer, int kv_head,
                     const std::vector<double>& p_by_token);

FamilyInfo cam_family();

/// The uniform in [0, 1) that gates the merge of `token` in (layer, kv head):
/// M = (u < p). SplitMix64 of the four integers; stable across runs and platforms.
double cam_uniform(std::uint64_t seed, int layer, int kv_head, std::int64_t token);

}  // namespace kvscope::ref
