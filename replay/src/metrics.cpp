#include "kvscope/replay/metrics.hpp"

#include <algorithm>
#include <cmath>

namespace kvscope::replay {

StepMetrics step_metrics(const ref::VecX& o_full, const ref::VecX& probs_full, const ref::VecX& o_c,
                         const ref::VecX& probs_c, const Plan& plan) {
  StepMetrics m;
  const double norm = o_full.norm(), norm_c = o_c.norm(), diff = (o_c - o_full).norm();
  m.rel_l2 = norm > 0 ? diff / norm : diff;
  m.err = diff;
  if (norm > 0 && norm_c > 0)
    m.cosine = std::clamp(o_c.dot(o_full) / (norm * norm_c), -1.0, 1.0);
  else
    m.cosine = (norm == 0 && norm_c == 0) ? 1.0 : 0.0;

  // Mass on evicted tokens, and the compressed distribution mapped back to
  // tokens when every row is one-hot (then TV compares like with like).
  std::vector<char> present(static_cast<std::size_t>(plan.n), 0);
  ref::VecX p_tokens = ref::VecX::Zero(plan.n);
  bool one_hot = true;
  for (std::int64_t i = 0; i < plan.slots(); ++i) {
    if (plan.row_end(i) - plan.row_begin(i) != 1) one_hot = false;
    for (std::int64_t e = plan.row_begin(i); e < plan.row_end(i); ++e) {
      const std::int64_t j = plan.token[static_cast<std::size_t>(e)];
      // A value-only share (coef_k 0, CaM) leaves the token's key evicted:
      // attention can no longer reach it, so its mass counts as lost.
      if (plan.coef_k[static_cast<std::size_t>(e)] != 0.0) present[static_cast<std::size_t>(j)] = 1;
      p_tokens[j] += probs_c[i];
    }
  }
  for (std::int64_t j = 0; j < plan.n; ++j)
    if (!present[static_cast<std::size_t>(j)]) m.mass_lost += probs_full[j];
  if (one_hot) m.tv = 0.5 * (probs_full - p_tokens).cwiseAbs().sum();
  return m;
}

void Aggregate::add(const StepMetrics& m, double kept_fraction) {
  ++count;
  sum_rel_l2 += m.rel_l2;
  max_rel_l2 = std::max(max_rel_l2, m.rel_l2);
  sum_cosine += m.cosine;
  min_cosine = std::min(min_cosine, m.cosine);
  sum_mass_lost += m.mass_lost;
  max_mass_lost = std::max(max_mass_lost, m.mass_lost);
  if (!std::isnan(m.tv)) {
    sum_tv += m.tv;
    ++tv_count;
  }
  sum_kept_fraction += kept_fraction;
  if (m.bound > 0) max_bound_ratio = std::max(max_bound_ratio, m.err / m.bound);
}

void Aggregate::merge(const Aggregate& o) {
  count += o.count;
  sum_rel_l2 += o.sum_rel_l2;
  max_rel_l2 = std::max(max_rel_l2, o.max_rel_l2);
  sum_cosine += o.sum_cosine;
  min_cosine = std::min(min_cosine, o.min_cosine);
  sum_mass_lost += o.sum_mass_lost;
  max_mass_lost = std::max(max_mass_lost, o.max_mass_lost);
  sum_tv += o.sum_tv;
  max_bound_ratio = std::max(max_bound_ratio, o.max_bound_ratio);
  tv_count += o.tv_count;
  sum_kept_fraction += o.sum_kept_fraction;
}

}  // namespace kvscope::replay
