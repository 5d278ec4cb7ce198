// Replay metrics (DESIGN.md section 5): per (layer, q head, decode step), the
// compressed-cache attention output against the full-cache one, and their
// aggregation per method and budget.
#pragma once

#include <cstdint>
#include <limits>

#include "kvscope/core/plan.hpp"
#include "kvscope/reference/attention.hpp"

namespace kvscope::replay {

struct StepMetrics {
  double rel_l2 = 0;     // ||o_c - o|| / ||o||  (absolute when ||o|| = 0)
  double cosine = 1;     // cos(o_c, o); 1 when both are zero
  double mass_lost = 0;  // full-cache attention on tokens in no slot (evicted)
  double tv = std::numeric_limits<double>::quiet_NaN();  // total variation; eviction plans only
  double bound = 0;      // perturbation bound on ||o_c - o|| (reference/perturbation_bound.hpp)
  double err = 0;        // ||o_c - o||, what the bound bounds
};

/// `probs_full` is over the n original tokens; `probs_c` over the plan's slots.
StepMetrics step_metrics(const ref::VecX& o_full, const ref::VecX& probs_full, const ref::VecX& o_c,
                         const ref::VecX& probs_c, const Plan& plan);

/// Running mean/min/max of StepMetrics.
struct Aggregate {
  std::int64_t count = 0;
  double sum_rel_l2 = 0, max_rel_l2 = 0;
  double sum_cosine = 0, min_cosine = 1;
  double sum_mass_lost = 0, max_mass_lost = 0;
  double sum_tv = 0;
  std::int64_t tv_count = 0;
  double sum_kept_fraction = 0;
  double max_bound_ratio = 0;  // max over steps of err / bound (<= 1 by the bound; 0 when bound is 0)

  void add(const StepMetrics& m, double kept_fraction);
  void merge(const Aggregate& o);
  double mean_rel_l2() const { return count ? sum_rel_l2 / static_cast<double>(count) : 0; }
  double mean_cosine() const { return count ? sum_cosine / static_cast<double>(count) : 1; }
  double mean_mass_lost() const { return count ? sum_mass_lost / static_cast<double>(count) : 0; }
  double mean_tv() const { return tv_count ? sum_tv / static_cast<double>(tv_count) : std::numeric_limits<double>::quiet_NaN(); }
  double mean_kept_fraction() const { return count ? sum_kept_fraction / static_cast<double>(count) : 1; }
};

}  // namespace kvscope::replay
