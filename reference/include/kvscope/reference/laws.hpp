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
};

struct Laws {
  BudgetLaw prefill_budget = BudgetLaw::kExact;
  BudgetLaw decode_budget = BudgetLaw::kNone;
  ConservationLaw conservation = ConservationLaw::kEviction;
};

inline const char* budget_law_name(BudgetLaw l) {
  switch (l) {
    case BudgetLaw::kExact: return "exact";
    case BudgetLaw::kAtMost: return "at-most";
    case BudgetLaw::kNone: return "none";
  }
  return "?";
}

inline const char* conservation_law_name(ConservationLaw l) {
  switch (l) {
    case ConservationLaw::kEviction: return "eviction";
    case ConservationLaw::kRowConvex: return "row-convex";
  }
  return "?";
}

}  // namespace kvscope::ref
