#include "kvscope/reference/perturbation_bound.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace kvscope::ref {

bool keys_kept(const Plan& plan) {
  if (plan.positions != PositionMode::kOriginal) return false;
  std::vector<char> seen(static_cast<std::size_t>(plan.n), 0);
  for (std::int64_t i = 0; i < plan.slots(); ++i) {
    int unit_keys = 0;
    for (std::int64_t e = plan.row_begin(i); e < plan.row_end(i); ++e) {
      const auto eu = static_cast<std::size_t>(e);
      if (plan.coef_k[eu] == 1.0) {
        ++unit_keys;
        auto& s = seen[static_cast<std::size_t>(plan.token[eu])];
        if (s) return false;
        s = 1;
      } else if (plan.coef_k[eu] != 0.0) {
        return false;
      }
    }
    if (unit_keys != 1) return false;
  }
  return true;
}

namespace {

/// The token whose key slot i holds (keys_kept plans only).
std::int64_t key_token(const Plan& plan, std::int64_t i) {
  for (std::int64_t e = plan.row_begin(i); e < plan.row_end(i); ++e)
    if (plan.coef_k[static_cast<std::size_t>(e)] == 1.0) return plan.token[static_cast<std::size_t>(e)];
  return -1;
}

PerturbationBound keys_kept_bound(const Plan& plan, const VecX& p, const MatX& V, const MatX& cache_V,
                                  const VecX& probs_c) {
  std::vector<char> kept(static_cast<std::size_t>(plan.n), 0);
  for (std::int64_t i = 0; i < plan.slots(); ++i) kept[static_cast<std::size_t>(key_token(plan, i))] = 1;
  double kept_mass = 0, max_kept = 0, max_evicted = 0;
  for (std::int64_t j = 0; j < plan.n; ++j) {
    const double norm = V.row(j).norm();
    if (kept[static_cast<std::size_t>(j)]) {
      kept_mass += p[j];
      max_kept = std::max(max_kept, norm);
    } else {
      max_evicted = std::max(max_evicted, norm);
    }
  }
  const double eps = std::max(0.0, 1.0 - kept_mass);
  // p'_i = p_t(i) / (1 - eps) in exact arithmetic; the compressed attention
  // itself is used because p_t(i) underflows to 0 when the evicted tokens
  // dominate a saturated softmax, while p' stays a proper distribution.
  double value_shift = 0;
  for (std::int64_t i = 0; i < plan.slots(); ++i)
    value_shift += probs_c[i] * (cache_V.row(i) - V.row(key_token(plan, i))).norm();
  return {eps * (max_kept + max_evicted) + value_shift, BoundKind::kKeysKept};
}

PerturbationBound distribution_bound(const Plan& plan, const VecX& p, const MatX& V, const VecX& probs_c) {
  VecX ptilde = VecX::Zero(plan.n);
  for (std::int64_t i = 0; i < plan.slots(); ++i)
    for (std::int64_t e = plan.row_begin(i); e < plan.row_end(i); ++e)
      ptilde[plan.token[static_cast<std::size_t>(e)]] += probs_c[i] * plan.coef_v[static_cast<std::size_t>(e)];
  const MatX Vn = V.topRows(plan.n);
  // sum_j (ptilde_j - p_j) c = 0 when both sum to 1: centring then tightens the bound.
  const bool same_mass = std::abs(ptilde.sum() - p.head(plan.n).sum()) < 1e-12;
  const Eigen::RowVectorXd c = same_mass && plan.n > 0 ? Eigen::RowVectorXd(Vn.colwise().mean())
                                                       : Eigen::RowVectorXd::Zero(V.cols());
  double b = 0;
  for (std::int64_t j = 0; j < plan.n; ++j) b += std::abs(ptilde[j] - p[j]) * (Vn.row(j) - c).norm();
  return {b, BoundKind::kDistribution};
}

}  // namespace

PerturbationBound perturbation_bound(const Plan& plan, const VecX& probs_full, const MatX& V_full,
                                     const MatX& cache_V, const VecX& probs_c) {
  if (keys_kept(plan)) return keys_kept_bound(plan, probs_full, V_full, cache_V, probs_c);
  return distribution_bound(plan, probs_full, V_full, probs_c);
}

const char* bound_kind_name(BoundKind kind) {
  return kind == BoundKind::kKeysKept ? "keys-kept" : "distribution";
}

}  // namespace kvscope::ref
