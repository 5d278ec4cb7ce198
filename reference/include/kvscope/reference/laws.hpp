// The laws a method declares about its plans, checked by the plan checker
// (plan_checker.hpp) after prefill and after every decode step.
#pragma once

#include <cstdint>
#include <vector>

namespace kvscope::ref {

enum class BudgetLaw {
  kExact,   // slots == min(budget, n) per head
  kAtMost,  // slots <= budget per head
  kNone,    // no promise (Full; prefill-only methods during decode)
};

enum class ConservationLaw {
  kEviction,   // rows one-hot with coefficient 1; each token in at most one slot; counts 1
  kRowConvex,  // coefficients >= 0 and each row of A_K and A_V sums to 1
  // Value-only merging (CaM): A_K one-hot with coefficient 1 (keys untouched);
  // each slot's value row holds its key's token with coefficient exactly 1 plus
  // non-negative shares of tokens whose keys were evicted; a kept token's value
  // is in no other slot; an evicted token's value coefficients sum to <= 1
  // (handed on at most once; 1 = fully, 0 = dropped, between = a share was
  // dropped again further down a merge cascade).
  kValueHandOff,
  // Merging with count-scaled values (KVMerger's |S|-scaling switch): each row
  // of A_K sums to 1, each row of A_V sums to the slot's count.
  kMergeScaledValues,
  // Merging with norm-preserving keys (EMS): each row of A_V sums to 1; A_K is
  // non-negative on the same tokens (the key is a positive multiple of a convex
  // combination, rescaled to its centre's norm: data-dependent, tested in
  // test_ems); the slot's position token (its centre) is in its row with a
  // positive value weight; count = entries; a one-entry row is (1, 1).
  kNormPreservingKeys,
};

/// How a layer's kv heads share the nominal per-head budget B (LayerPlans::head_budgets).
enum class AllocationLaw {
  kUniform,     // every head gets B
  kHeadShared,  // heads differ; the sum is H·B up to one token of rounding per head (AdaKV)
  kPerLayer,    // all heads of a layer get the same, possibly layer-dependent, budget (PyramidKV)
};

struct Laws {
  BudgetLaw prefill_budget = BudgetLaw::kExact;
  BudgetLaw decode_budget = BudgetLaw::kNone;
  ConservationLaw conservation = ConservationLaw::kEviction;
  AllocationLaw allocation = AllocationLaw::kUniform;
};

inline const char* budget_law_name(BudgetLaw l) {
  switch (l) {
    case BudgetLaw::kExact: return "exact";
    case BudgetLaw::kAtMost: return "at-most";
    case BudgetLaw::kNone: return "none";
  }
  return "?";
}

inline const char* allocation_law_name(AllocationLaw l) {
  switch (l) {
    case AllocationLaw::kUniform: return "uniform";
    case AllocationLaw::kHeadShared: return "head-shared";
    case AllocationLaw::kPerLayer: return "per-layer";
  }
  return "?";
}

inline const char* conservation_law_name(ConservationLaw l) {
  switch (l) {
    case ConservationLaw::kEviction: return "eviction";
    case ConservationLaw::kRowConvex: return "row-convex";
    case ConservationLaw::kValueHandOff: return "value-hand-off";
    case ConservationLaw::kMergeScaledValues: return "merge-scaled-values";
    case ConservationLaw::kNormPreservingKeys: return "norm-preserving-keys";
  }
  return "?";
}

}  // namespace kvscope::ref
