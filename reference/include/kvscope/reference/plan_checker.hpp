// The plan checker: the one place that verifies a plan against its method's
// declared budget law and conservation law, the accounting of every original
// token, and the protected tokens (DESIGN.md section 1).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kvscope/core/plan.hpp"
#include "kvscope/reference/laws.hpp"

namespace kvscope::ref {

struct CheckRequest {
  BudgetLaw budget_law = BudgetLaw::kNone;
  std::int64_t budget = 0;  // tokens per head
  ConservationLaw conservation = ConservationLaw::kEviction;
  std::vector<std::int64_t> protected_tokens;  // must be kept, alone and unchanged
};

struct PlanCheck {
  std::vector<std::string> violations;
  bool ok() const { return violations.empty(); }
  /// All violations on one line each, at most `max_lines`.
  std::string summary(std::size_t max_lines = 8) const;
};

/// Checks everything; never throws for a bad plan (returns violations).
PlanCheck check_plan(const Plan& plan, const CheckRequest& request);

/// Checks a layer's declared per-head budgets against its allocation law and
/// the nominal budget (never throws; returns violations).
PlanCheck check_allocation(const std::vector<std::int64_t>& head_budgets, std::int64_t nominal_budget,
                           AllocationLaw law);

/// check_plan, throwing Error(kInvariant) prefixed with `context` on any violation.
void require_valid_plan(const Plan& plan, const CheckRequest& request, std::string_view context);

/// check_allocation, throwing Error(kInvariant) prefixed with `context`.
void require_valid_allocation(const std::vector<std::int64_t>& head_budgets, std::int64_t nominal_budget,
                              AllocationLaw law, std::string_view context);

}  // namespace kvscope::ref
