// Plan algebra (compose, append) and the plan checker, including that every
// law it enforces actually fires on a plan that breaks it.
#include <gtest/gtest.h>

#include <limits>

#include "kvscope/core/error.hpp"
#include "kvscope/core/plan.hpp"
#include "kvscope/reference/plan_checker.hpp"

using namespace kvscope;
using ref::BudgetLaw;
using ref::CheckRequest;
using ref::ConservationLaw;

namespace {
CheckRequest eviction(BudgetLaw law, std::int64_t budget, std::vector<std::int64_t> prot = {}) {
  return {law, budget, ConservationLaw::kEviction, std::move(prot)};
}
bool mentions(const ref::PlanCheck& c, const std::string& text) {
  for (const auto& v : c.violations)
    if (v.find(text) != std::string::npos) return true;
  return false;
}
}  // namespace

TEST(Plan, KeepComposeAndAppend) {
  const std::vector<std::int64_t> first{0, 2, 3, 5};
  const Plan inner = Plan::keep(6, first);
  const std::vector<std::int64_t> second{0, 3};  // slots 0 and 3 = tokens 0 and 5
  const Plan both = compose(Plan::keep(4, second), inner);
  ASSERT_EQ(both.slots(), 2);
  EXPECT_EQ(both.n, 6);
  EXPECT_EQ(both.token, (std::vector<std::int64_t>{0, 5}));
  EXPECT_EQ(both.position, (std::vector<std::int64_t>{0, 5}));  // original positions survive
  Plan grown = both;
  append_token(grown);
  EXPECT_EQ(grown.n, 7);
  EXPECT_EQ(grown.token.back(), 6);
  EXPECT_EQ(evicted_tokens(grown), (std::vector<std::int64_t>{1, 2, 3, 4}));
}

TEST(Plan, ComposeSumsCountsAndMergesWeights) {
  Plan inner;  // slot 0 = 0.5 t0 + 0.5 t1, slot 1 = t2
  inner.n = 3;
  const std::int64_t t01[] = {0, 1};
  const double half[] = {0.5, 0.5};
  inner.add_row(t01, half, half, 0, 2);
  inner.add_kept(2);
  Plan outer;  // one slot averaging both
  outer.n = 2;
  const std::int64_t s01[] = {0, 1};
  outer.add_row(s01, half, half, 1, 0);
  const Plan p = compose(outer, inner);
  ASSERT_EQ(p.slots(), 1);
  EXPECT_EQ(p.count[0], 3);
  EXPECT_EQ(p.token, (std::vector<std::int64_t>{0, 1, 2}));
  EXPECT_DOUBLE_EQ(p.coef_k[0] + p.coef_k[1] + p.coef_k[2], 1.0);
  EXPECT_TRUE(ref::check_plan(p, {BudgetLaw::kExact, 1, ConservationLaw::kRowConvex, {}}).ok());
}

TEST(PlanChecker, AcceptsAValidEvictionPlan) {
  const std::vector<std::int64_t> kept{0, 1, 7, 8, 9};
  const Plan p = Plan::keep(10, kept);
  EXPECT_TRUE(ref::check_plan(p, eviction(BudgetLaw::kExact, 5, {0, 1, 9})).ok());
  EXPECT_TRUE(ref::check_plan(p, eviction(BudgetLaw::kAtMost, 6)).ok());
}

TEST(PlanChecker, ExactBudgetLawFires) {
  const std::vector<std::int64_t> kept{0, 1, 2};
  const auto c = ref::check_plan(Plan::keep(10, kept), eviction(BudgetLaw::kExact, 4));
  EXPECT_TRUE(mentions(c, "budget law 'exact'")) << c.summary();
}

TEST(PlanChecker, AtMostBudgetLawFires) {
  const auto c = ref::check_plan(Plan::identity(5), eviction(BudgetLaw::kAtMost, 4));
  EXPECT_TRUE(mentions(c, "exceed budget 4")) << c.summary();
}

TEST(PlanChecker, ProtectedTokenFires) {
  const std::vector<std::int64_t> kept{1, 2, 3};
  const auto c = ref::check_plan(Plan::keep(5, kept), eviction(BudgetLaw::kNone, 0, {0}));
  EXPECT_TRUE(mentions(c, "protected token 0")) << c.summary();
}

TEST(PlanChecker, DuplicateTokenFiresUnderEviction) {
  Plan p = Plan::identity(3);
  p.add_kept(1);
  const auto c = ref::check_plan(p, eviction(BudgetLaw::kNone, 0));
  EXPECT_TRUE(mentions(c, "token 1 appears in 2 slots")) << c.summary();
}

TEST(PlanChecker, NonOneHotRowFiresUnderEviction) {
  Plan p;
  p.n = 2;
  const std::int64_t t[] = {0, 1};
  const double w[] = {0.5, 0.5};
  p.add_row(t, w, w, 0, 2);
  const auto c = ref::check_plan(p, eviction(BudgetLaw::kNone, 0));
  EXPECT_TRUE(mentions(c, "not one-hot")) << c.summary();
  EXPECT_TRUE(ref::check_plan(p, {BudgetLaw::kNone, 0, ConservationLaw::kRowConvex, {}}).ok());
}

TEST(PlanChecker, RowConvexFiresOnBadSums) {
  Plan p;
  p.n = 2;
  const std::int64_t t[] = {0, 1};
  const double w[] = {0.5, 0.6};
  p.add_row(t, w, w, 0, 2);
  const auto c = ref::check_plan(p, {BudgetLaw::kNone, 0, ConservationLaw::kRowConvex, {}});
  EXPECT_TRUE(mentions(c, "row-convex")) << c.summary();
}

TEST(PlanChecker, BrokenStructureFiresWithoutCrashing) {
  Plan p = Plan::identity(3);
  p.token[1] = 17;  // out of range
  EXPECT_TRUE(mentions(ref::check_plan(p, eviction(BudgetLaw::kNone, 0)), "outside [0, 3)"));
  Plan q = Plan::identity(3);
  q.coef_v.pop_back();
  EXPECT_FALSE(ref::check_plan(q, eviction(BudgetLaw::kNone, 0)).ok());
  Plan r = Plan::identity(3);
  r.coef_k[0] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(mentions(ref::check_plan(r, eviction(BudgetLaw::kNone, 0)), "non-finite"));
}

TEST(PlanChecker, RequireThrowsInvariantWithContext) {
  try {
    ref::require_valid_plan(Plan::identity(5), eviction(BudgetLaw::kExact, 2), "ctx layer 3");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvariant);
    EXPECT_NE(std::string(e.what()).find("ctx layer 3"), std::string::npos);
  }
}
