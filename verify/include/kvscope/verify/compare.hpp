// Comparisons of a backend's result with the reference's, one place each:
// selections (tie-aware, canonicalised by original token) and numbers
// (relative L2, cosine, the naive-low-precision bound, NaN never passes).
#pragma once

#include <cstdint>
#include <limits>
#include <span>
#include <string>

#include "kvscope/core/plan.hpp"
#include "kvscope/reference/attention.hpp"
#include "kvscope/core/tolerance.hpp"

namespace kvscope::verify {

struct SelectionDiff {
  std::int64_t kept_ref = 0, kept_opt = 0;
  std::int64_t ties = 0;        // differing decisions inside the reference margin (allowed, reported)
  std::int64_t mismatches = 0;  // differing decisions outside it (a failure)
  double jaccard = 0;           // 1 - |A and B| / |A or B| of the kept token sets
  bool plans_equal = false;     // identical plans (rows, coefficients, positions, counts)
  std::string first_mismatch;   // names a token, empty when none
  bool pass() const { return mismatches == 0; }
};

/// Compares two plans of one kv head. Kept sets are canonicalised by original
/// token (never by slot order). With `ref_scores` (the reference's score per
/// token, over candidates), a token kept by one side only is a tie when its
/// score lies within delta * max|score| of the reference's decision boundary
/// (min kept / max evicted candidate score), otherwise a mismatch; without
/// scores, any difference is a mismatch. `is_protected` (nullable, per token)
/// excludes protected tokens from the boundary.
///
/// Merge plans (every token in some slot, so the kept sets agree): slots are
/// matched by their sorted tokens, position and count; matched slots may differ
/// in coefficients by kCoefficientTolerance of the slot's total weight (fp32
/// merge weights; beyond that a mismatch, unless `reweights_follow_decisions`
/// and the margin below: KVMerger's flipped decision moves slot boundaries,
/// positions or counts, never only weights; WeightedKV's merge order can). Any other difference is a mismatch unless
/// `decision_margin` (the reference's smallest relative margin over the head's
/// chained merge decisions, ref::LayerScores::head_margin) is <= delta: then
/// each token whose slot differs counts as a tie, and so does a token kept by
/// one side only (EMS's zero class, CaM's gate: kept sets follow from chained
/// decisions there).
SelectionDiff compare_selection(const Plan& ref, const Plan& opt, const ref::VecX* ref_scores,
                                std::span<const char> is_protected, double delta,
                                double decision_margin = std::numeric_limits<double>::infinity(),
                                bool reweights_follow_decisions = false);

/// Plan coefficients computed in fp32 (Gaussian merge weights, WeightedKV's
/// products of lambdas) agree with the reference within this share of their
/// slot's total |weight|.
inline constexpr double kCoefficientTolerance = 1e-3;

struct NumberDiff {
  std::int64_t count = 0;
  std::int64_t non_finite = 0;  // NaN or Inf in the backend's output (poisoned rows never written)
  double rel_l2 = 0;            // ||opt - ref|| / ||ref||
  double cosine = 1;
  double naive_rel_l2 = 0;      // the reference rounded to the storage dtype
  double bound = 0;             // k * naive + floor
  bool pass = false;
  std::string why;              // the failed criterion, empty on pass
};

/// `ref` in double, `opt` as the backend produced it (fp32 values), `naive`
/// the reference rounded to the storage dtype; all the same length.
NumberDiff compare_numbers(std::span<const double> ref, std::span<const float> opt, std::span<const double> naive,
                           const Tolerance& tol);

}  // namespace kvscope::verify
