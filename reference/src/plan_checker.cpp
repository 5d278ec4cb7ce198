#include "kvscope/reference/plan_checker.hpp"

#include <cmath>
#include <cstdlib>
#include <sstream>

#include "kvscope/core/error.hpp"

namespace kvscope::ref {
namespace {

constexpr double kCoefTol = 1e-12;  // row sums of double weights

// Structure first: later checks index arrays and must not run on a broken CSR.
bool check_structure(const Plan& p, std::vector<std::string>& v) {
  const auto m = p.slots();
  if (m < 0 || p.row_ptr.empty() || p.row_ptr.front() != 0) {
    v.push_back("row_ptr must start at 0");
    return false;
  }
  if (p.row_ptr.back() != p.nnz() || p.coef_k.size() != p.token.size() || p.coef_v.size() != p.token.size()) {
    v.push_back("row_ptr, token, coef_k and coef_v disagree on the number of entries");
    return false;
  }
  if (static_cast<std::int64_t>(p.position.size()) != m || static_cast<std::int64_t>(p.count.size()) != m) {
    v.push_back("position and count must have one entry per slot");
    return false;
  }
  for (std::int64_t i = 0; i < m; ++i)
    if (p.row_end(i) < p.row_begin(i)) {
      v.push_back("row_ptr decreases at slot " + std::to_string(i));
      return false;
    }
  bool ok = true;
  for (std::int64_t e = 0; e < p.nnz(); ++e) {
    const auto eu = static_cast<std::size_t>(e);
    if (p.token[eu] < 0 || p.token[eu] >= p.n) {
      v.push_back("entry " + std::to_string(e) + " names token " + std::to_string(p.token[eu]) +
                  " outside [0, " + std::to_string(p.n) + ")");
      ok = false;
    }
    if (!std::isfinite(p.coef_k[eu]) || !std::isfinite(p.coef_v[eu]) || p.coef_k[eu] < 0 || p.coef_v[eu] < 0) {
      v.push_back("entry " + std::to_string(e) + " has a negative or non-finite coefficient");
      ok = false;
    }
  }
  return ok;
}

void check_budget(const Plan& p, const CheckRequest& r, std::vector<std::string>& v) {
  const std::int64_t m = p.slots();
  const std::int64_t want = std::min(r.budget, p.n);
  if (r.budget_law == BudgetLaw::kExact && m != want)
    v.push_back("budget law 'exact': " + std::to_string(m) + " slots, expected min(budget " +
                std::to_string(r.budget) + ", n " + std::to_string(p.n) + ") = " + std::to_string(want));
  if (r.budget_law == BudgetLaw::kAtMost && m > r.budget)
    v.push_back("budget law 'at-most': " + std::to_string(m) + " slots exceed budget " + std::to_string(r.budget));
}

// Norm-preserving keys (EMS, laws.hpp kNormPreservingKeys): one row's rules;
// the key's norm itself needs the data and is tested in test_ems.
void check_norm_preserving_row(const Plan& p, std::int64_t i, double sv, std::vector<std::string>& v) {
  const std::string slot = "slot " + std::to_string(i);
  const auto iu = static_cast<std::size_t>(i);
  const std::int64_t len = p.row_end(i) - p.row_begin(i);
  if (std::abs(sv - 1.0) > kCoefTol)
    v.push_back(slot + " value row sums to " + std::to_string(sv) + ", norm-preserving-keys law needs 1");
  if (p.count[iu] != len)
    v.push_back(slot + " counts " + std::to_string(p.count[iu]) + " tokens but has " + std::to_string(len) + " entries");
  bool centre = false;
  for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e) {
    const auto eu = static_cast<std::size_t>(e);
    if (p.token[eu] == p.position[iu] && p.coef_v[eu] > 0) centre = true;
    if (len == 1 && (p.coef_k[eu] != 1.0 || p.coef_v[eu] != 1.0))
      v.push_back(slot + " holds one token with coefficients other than (1, 1)");
  }
  if (!centre && len > 0)
    v.push_back(slot + " does not hold its centre token " + std::to_string(p.position[iu]) + " with a positive value weight");
}

void check_conservation(const Plan& p, const CheckRequest& r, std::vector<std::string>& v) {
  std::vector<int> uses(static_cast<std::size_t>(p.n), 0);
  for (std::int64_t i = 0; i < p.slots(); ++i) {
    const std::int64_t len = p.row_end(i) - p.row_begin(i);
    double sk = 0, sv = 0;
    for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e) {
      sk += p.coef_k[static_cast<std::size_t>(e)];
      sv += p.coef_v[static_cast<std::size_t>(e)];
      ++uses[static_cast<std::size_t>(p.token[static_cast<std::size_t>(e)])];
    }
    const std::string slot = "slot " + std::to_string(i);
    if (len == 0) v.push_back(slot + " is empty");
    if (r.conservation == ConservationLaw::kEviction) {
      const auto b = static_cast<std::size_t>(p.row_begin(i));
      if (len != 1 || p.coef_k[b] != 1.0 || p.coef_v[b] != 1.0)
        v.push_back(slot + " is not one-hot with coefficient 1 (eviction law)");
      if (p.count[static_cast<std::size_t>(i)] != 1) v.push_back(slot + " counts " + std::to_string(p.count[static_cast<std::size_t>(i)]) + " tokens, eviction keeps 1");
    } else if (r.conservation == ConservationLaw::kRowConvex &&
               (std::abs(sk - 1.0) > kCoefTol || std::abs(sv - 1.0) > kCoefTol)) {
      v.push_back(slot + " rows sum to (" + std::to_string(sk) + ", " + std::to_string(sv) + "), row-convex law needs 1");
    } else if (r.conservation == ConservationLaw::kMergeScaledValues) {
      const auto cnt = static_cast<double>(p.count[static_cast<std::size_t>(i)]);
      if (std::abs(sk - 1.0) > kCoefTol || std::abs(sv - cnt) > kCoefTol * cnt)
        v.push_back(slot + " rows sum to (" + std::to_string(sk) + ", " + std::to_string(sv) +
                    "), merge-scaled-values law needs (1, count " + std::to_string(cnt) + ")");
    } else if (r.conservation == ConservationLaw::kNormPreservingKeys) {
      check_norm_preserving_row(p, i, sv, v);
    }
    if (p.positions == PositionMode::kRerotated && p.position[static_cast<std::size_t>(i)] != i)
      v.push_back(slot + " is re-rotated but carries position " + std::to_string(p.position[static_cast<std::size_t>(i)]));
  }
  // Accounting: eviction and merging partition tokens; none may stand in two
  // slots (value hand-off has its own rule below).
  if (r.conservation != ConservationLaw::kValueHandOff)
    for (std::int64_t j = 0; j < p.n; ++j)
      if (uses[static_cast<std::size_t>(j)] > 1)
        v.push_back("token " + std::to_string(j) + " appears in " + std::to_string(uses[static_cast<std::size_t>(j)]) + " slots");
}

// Value hand-off (CaM): keys untouched, each slot's own value intact, merged
// value mass of an evicted token at most 1 in total (laws.hpp kValueHandOff).
void check_value_hand_off(const Plan& p, std::vector<std::string>& v) {
  constexpr double kMassTol = 1e-9;  // sums of many products of 1/m shares
  std::vector<std::int64_t> key_slot(static_cast<std::size_t>(p.n), -1);
  for (std::int64_t i = 0; i < p.slots(); ++i) {
    std::int64_t keys = 0, key = -1;
    for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e) {
      const auto eu = static_cast<std::size_t>(e);
      if (p.coef_k[eu] == 0.0) continue;
      ++keys;
      key = p.token[eu];
      if (p.coef_k[eu] != 1.0 || p.coef_v[eu] != 1.0)
        v.push_back("slot " + std::to_string(i) + " key token " + std::to_string(key) +
                    " is not carried with coefficients (1, 1) (value-hand-off law)");
    }
    if (keys != 1) {
      v.push_back("slot " + std::to_string(i) + " has " + std::to_string(keys) + " key entries, value-hand-off keeps 1");
    } else if (key_slot[static_cast<std::size_t>(key)] >= 0) {
      v.push_back("token " + std::to_string(key) + " is the key of two slots");
    } else {
      key_slot[static_cast<std::size_t>(key)] = i;
    }
  }
  std::vector<double> mass(static_cast<std::size_t>(p.n), 0.0);
  for (std::int64_t i = 0; i < p.slots(); ++i)
    for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e) {
      const auto eu = static_cast<std::size_t>(e);
      const auto j = static_cast<std::size_t>(p.token[eu]);
      if (p.coef_k[eu] != 0.0) continue;
      if (key_slot[j] >= 0)
        v.push_back("kept token " + std::to_string(j) + " also hands its value to slot " + std::to_string(i));
      mass[j] += p.coef_v[eu];
    }
  for (std::size_t j = 0; j < mass.size(); ++j)
    if (mass[j] > 1.0 + kMassTol)
      v.push_back("evicted token " + std::to_string(j) + " hands on value mass " + std::to_string(mass[j]) + " > 1");
}

void check_protected(const Plan& p, const CheckRequest& r, std::vector<std::string>& v) {
  std::vector<char> alone(static_cast<std::size_t>(p.n), 0);
  for (std::int64_t i = 0; i < p.slots(); ++i) {
    const auto b = static_cast<std::size_t>(p.row_begin(i));
    if (p.row_end(i) - p.row_begin(i) == 1 && p.coef_k[b] == 1.0 && p.coef_v[b] == 1.0)
      alone[static_cast<std::size_t>(p.token[b])] = 1;
  }
  for (std::int64_t j : r.protected_tokens)
    if (j >= 0 && j < p.n && !alone[static_cast<std::size_t>(j)])
      v.push_back("protected token " + std::to_string(j) + " is not kept unchanged in its own slot");
}

}  // namespace

std::string PlanCheck::summary(std::size_t max_lines) const {
  std::ostringstream s;
  for (std::size_t i = 0; i < violations.size() && i < max_lines; ++i) s << (i ? "\n  " : "") << violations[i];
  if (violations.size() > max_lines) s << "\n  ... and " << violations.size() - max_lines << " more";
  return s.str();
}

PlanCheck check_plan(const Plan& plan, const CheckRequest& request) {
  PlanCheck c;
  if (!check_structure(plan, c.violations)) return c;
  check_budget(plan, request, c.violations);
  check_conservation(plan, request, c.violations);
  if (request.conservation == ConservationLaw::kValueHandOff) check_value_hand_off(plan, c.violations);
  check_protected(plan, request, c.violations);
  return c;
}

void require_valid_plan(const Plan& plan, const CheckRequest& request, std::string_view context) {
  const PlanCheck c = check_plan(plan, request);
  if (!c.ok()) throw Error(ErrorKind::kInvariant, std::string(context) + ": " + c.summary());
}

PlanCheck check_allocation(const std::vector<std::int64_t>& head_budgets, std::int64_t nominal_budget,
                           AllocationLaw law) {
  PlanCheck c;
  auto fail = [&](const std::string& what) {
    c.violations.push_back(std::string("allocation (") + allocation_law_name(law) + "): " + what);
  };
  const auto heads = static_cast<std::int64_t>(head_budgets.size());
  std::int64_t sum = 0;
  for (std::int64_t h = 0; h < heads; ++h) {
    const std::int64_t b = head_budgets[static_cast<std::size_t>(h)];
    sum += b;
    if (b < 0) fail("head " + std::to_string(h) + " has a negative budget " + std::to_string(b));
    if (law == AllocationLaw::kUniform && b != nominal_budget)
      fail("head " + std::to_string(h) + " budget " + std::to_string(b) + " != " + std::to_string(nominal_budget));
    if (law == AllocationLaw::kPerLayer && b != head_budgets.front())
      fail("head " + std::to_string(h) + " budget " + std::to_string(b) + " differs from head 0's " +
           std::to_string(head_budgets.front()));
  }
  // Rounding each head's share moves the total by at most one token per head.
  if (law == AllocationLaw::kHeadShared && std::abs(sum - heads * nominal_budget) > heads)
    fail("heads hold " + std::to_string(sum) + " tokens, not " + std::to_string(heads * nominal_budget) + " +- " +
         std::to_string(heads));
  return c;
}

void require_valid_allocation(const std::vector<std::int64_t>& head_budgets, std::int64_t nominal_budget,
                              AllocationLaw law, std::string_view context) {
  const PlanCheck c = check_allocation(head_budgets, nominal_budget, law);
  if (!c.ok()) throw Error(ErrorKind::kInvariant, std::string(context) + ": " + c.summary());
}

}  // namespace kvscope::ref
