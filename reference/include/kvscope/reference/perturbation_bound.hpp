// Perturbation bounds: how far a plan can move one query's attention output,
// ||o' - o||, with o over the full cache and o' over the compressed one
// (DESIGN.md section 4.3). Replay and the property tests require
// measured <= bound on every step; docs/verification.md derives both forms.
#pragma once

#include "kvscope/core/plan.hpp"
#include "kvscope/reference/attention.hpp"

namespace kvscope::ref {

enum class BoundKind {
  kKeysKept,      // analytic: key rows one-hot, coefficient 1, original positions
  kDistribution,  // any plan: from the compressed attention distribution
};

struct PerturbationBound {
  double value = 0;
  BoundKind kind = BoundKind::kDistribution;
};

/// True when every key row is one-hot with coefficient 1, no token's key is
/// in two slots, and positions are original: the compressed logits are then
/// the full logits of the kept keys and the analytic bound applies.
bool keys_kept(const Plan& plan);

/// The bound for one query. `probs_full`: the full-cache attention over the
/// plan's n tokens; `V_full`: their values (>= n rows); `cache_V`: the
/// compressed values (one row per slot); `probs_c`: the compressed attention
/// over the slots.
///
///  keys kept (eps = full attention mass on tokens whose key is in no slot,
///  t(i) the token whose key slot i holds, p'_i the compressed attention,
///  which equals p_t(i) / (1 - eps) in exact arithmetic):
///    eps (max_kept ||v|| + max_evicted ||v||) + sum_i p'_i ||V'_i - v_t(i)||
///  which for pure eviction is <= 2 eps max ||v||.
///  distribution (any plan; ptilde_j = sum_i p'_i coef_v[i, j]):
///    sum_j |ptilde_j - p_j| ||v_j - c||, with c = the mean of the v_j when
///    ptilde sums to 1 (row-convex values) and c = 0 otherwise.
PerturbationBound perturbation_bound(const Plan& plan, const VecX& probs_full, const MatX& V_full,
                                     const MatX& cache_V, const VecX& probs_c);

const char* bound_kind_name(BoundKind kind);

}  // namespace kvscope::ref
