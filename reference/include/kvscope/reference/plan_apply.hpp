// Plan application: the compressed cache a plan describes,
//   K'_i = sum_j coef_k[i,j] K_j,  V'_i = sum_j coef_v[i,j] V_j,
// with re-rotated plans additionally moving each key from its original
// position j to its slot position (one-hot rows only, checked).
#pragma once

#include "kvscope/core/plan.hpp"
#include "kvscope/reference/attention.hpp"
#include "kvscope/reference/method.hpp"

namespace kvscope::ref {

/// K_full and V_full hold at least plan.n rows (the original tokens in order).
HeadCache apply_plan(const Plan& plan, const MatX& K_full, const MatX& V_full, double rope_theta);

/// Log-count bias per slot (log of the tokens a slot stands for), for
/// count-aware attention over merged caches.
VecX log_count_bias(const Plan& plan);

}  // namespace kvscope::ref
