// The plan checker's value-hand-off law (CaM): accepts merged value rows over
// untouched keys and fires on every way such a plan can break the law.
#include <gtest/gtest.h>

#include "kvscope/core/plan.hpp"
#include "kvscope/reference/plan_checker.hpp"

using namespace kvscope;
using ref::BudgetLaw;
using ref::ConservationLaw;

namespace {

ref::CheckRequest handoff(std::vector<std::int64_t> prot = {}) {
  return {BudgetLaw::kNone, 0, ConservationLaw::kValueHandOff, std::move(prot)};
}

bool mentions(const ref::PlanCheck& c, const std::string& text) {
  for (const auto& v : c.violations)
    if (v.find(text) != std::string::npos) return true;
  return false;
}

// A slot keeping `key` whose value also holds `shares` of other tokens.
void add_slot(Plan& p, std::int64_t key, std::vector<std::pair<std::int64_t, double>> shares, double ck = 1.0,
              double cv = 1.0) {
  std::vector<std::int64_t> t{key};
  std::vector<double> k{ck}, v{cv};
  for (auto [j, w] : shares) {
    t.push_back(j);
    k.push_back(0.0);
    v.push_back(w);
  }
  p.add_row(t, k, v, key, static_cast<std::int64_t>(t.size()));
}

// Tokens 0..4: sink 0 kept alone, token 1 handed to 2 and 3 in halves, token 4 kept.
Plan cam_like() {
  Plan p;
  p.n = 5;
  add_slot(p, 0, {});
  add_slot(p, 2, {{1, 0.5}});
  add_slot(p, 3, {{1, 0.5}});
  add_slot(p, 4, {});
  return p;
}

}  // namespace

TEST(PlanCheckerHandOff, AcceptsMergedValuesOverUntouchedKeys) {
  const auto c = ref::check_plan(cam_like(), handoff({0, 4}));
  EXPECT_TRUE(c.ok()) << c.summary();
  // The same plan breaks eviction (rows not one-hot): the laws differ.
  EXPECT_FALSE(ref::check_plan(cam_like(), {BudgetLaw::kNone, 0, ConservationLaw::kEviction, {}}).ok());
  // A plain eviction plan is a hand-off plan with nothing handed on.
  const std::vector<std::int64_t> kept{0, 3, 4};
  EXPECT_TRUE(ref::check_plan(Plan::keep(5, kept), handoff()).ok());
  EXPECT_STREQ(ref::conservation_law_name(ConservationLaw::kValueHandOff), "value-hand-off");
}

TEST(PlanCheckerHandOff, PartialAndFullMassBothPass) {
  Plan p;  // thirds sum to 1 only up to rounding; 0.25 is a share dropped down a cascade
  p.n = 6;
  add_slot(p, 2, {{0, 1.0 / 3}, {1, 0.25}});
  add_slot(p, 3, {{0, 1.0 / 3}});
  add_slot(p, 4, {{0, 1.0 / 3}});
  add_slot(p, 5, {});
  EXPECT_TRUE(ref::check_plan(p, handoff()).ok()) << ref::check_plan(p, handoff()).summary();
}

TEST(PlanCheckerHandOff, MassAboveOneFires) {
  Plan p;
  p.n = 4;
  add_slot(p, 2, {{1, 0.6}});
  add_slot(p, 3, {{1, 0.6}});
  const auto c = ref::check_plan(p, handoff());
  EXPECT_TRUE(mentions(c, "evicted token 1 hands on value mass")) << c.summary();
}

TEST(PlanCheckerHandOff, ModifiedKeyFires) {
  Plan p;
  p.n = 3;
  add_slot(p, 1, {{0, 0.5}}, 0.5, 1.0);  // key scaled
  EXPECT_TRUE(mentions(ref::check_plan(p, handoff()), "not carried with coefficients (1, 1)"));
  Plan q;
  q.n = 3;
  add_slot(q, 1, {{0, 0.5}}, 1.0, 0.75);  // own value scaled
  EXPECT_TRUE(mentions(ref::check_plan(q, handoff()), "not carried with coefficients (1, 1)"));
}

TEST(PlanCheckerHandOff, MergedKeyFires) {
  Plan p;  // two key entries in one slot: a key merge, not a value hand-off
  p.n = 2;
  const std::int64_t t[] = {0, 1};
  const double k[] = {1.0, 1.0}, v[] = {1.0, 0.0};
  p.add_row(t, k, v, 0, 2);
  EXPECT_TRUE(mentions(ref::check_plan(p, handoff()), "has 2 key entries"));
  Plan q;  // no key at all
  q.n = 2;
  const std::int64_t t1[] = {0};
  const double k0[] = {0.0}, v1[] = {1.0};
  q.add_row(t1, k0, v1, 0, 1);
  EXPECT_TRUE(mentions(ref::check_plan(q, handoff()), "has 0 key entries"));
}

TEST(PlanCheckerHandOff, KeptTokenHandedOnOrKeyedTwiceFires) {
  Plan p;
  p.n = 3;
  add_slot(p, 1, {});
  add_slot(p, 2, {{1, 0.5}});  // token 1 is kept, yet also handed to slot 1
  EXPECT_TRUE(mentions(ref::check_plan(p, handoff()), "kept token 1 also hands its value"));
  Plan q;
  q.n = 3;
  add_slot(q, 1, {});
  add_slot(q, 1, {});
  EXPECT_TRUE(mentions(ref::check_plan(q, handoff()), "token 1 is the key of two slots"));
}

TEST(PlanCheckerHandOff, ProtectedTokenReceivingValuesFires) {
  // Token 2 receives a share, so it is no longer "kept unchanged in its own slot".
  const auto c = ref::check_plan(cam_like(), handoff({2}));
  EXPECT_TRUE(mentions(c, "protected token 2")) << c.summary();
}
