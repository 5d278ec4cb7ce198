#include "kvscope/reference/plan_apply.hpp"

#include <cmath>

#include "kvscope/core/error.hpp"

namespace kvscope::ref {

HeadCache apply_plan(const Plan& plan, const MatX& K_full, const MatX& V_full, double rope_theta) {
  if (K_full.rows() < plan.n || V_full.rows() < plan.n)
    throw Error(ErrorKind::kInternal, "apply_plan: the plan ranges over more tokens than given");
  const bool rerotate = plan.positions == PositionMode::kRerotated;
  HeadCache c;
  c.plan = plan;
  c.K = MatX::Zero(plan.slots(), K_full.cols());
  c.V = MatX::Zero(plan.slots(), V_full.cols());
  for (std::int64_t i = 0; i < plan.slots(); ++i) {
    if (rerotate && plan.row_end(i) - plan.row_begin(i) != 1)
      throw Error(ErrorKind::kInvariant, "apply_plan: a re-rotated plan must have one-hot rows");
    for (std::int64_t e = plan.row_begin(i); e < plan.row_end(i); ++e) {
      const auto eu = static_cast<std::size_t>(e);
      const std::int64_t j = plan.token[eu];
      if (rerotate) {
        const double delta = static_cast<double>(plan.position[static_cast<std::size_t>(i)] - j);
        c.K.row(i) += plan.coef_k[eu] * rope_rotate(K_full.row(j).transpose(), delta, rope_theta).transpose();
      } else {
        c.K.row(i) += plan.coef_k[eu] * K_full.row(j);
      }
      c.V.row(i) += plan.coef_v[eu] * V_full.row(j);
    }
  }
  return c;
}

VecX log_count_bias(const Plan& plan) {
  VecX b(plan.slots());
  for (std::int64_t i = 0; i < plan.slots(); ++i)
    b[i] = std::log(static_cast<double>(plan.count[static_cast<std::size_t>(i)]));
  return b;
}

}  // namespace kvscope::ref
