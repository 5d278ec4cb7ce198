// KNorm: the oracle (max kept norm <= min evicted norm per kv head), tie
// reporting, protection knobs, skipped layers, budgets and an end-to-end replay.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/knorm.hpp"
#include "kvscope/reference/plan_checker.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scorer.hpp"
#include "kvscope/replay/replay.hpp"
#include "kvscope/traces/synth.hpp"
#include "kvscope_layer.hpp"
#include "kvscope_test_gen.hpp"
#include "kvscope_method_test.hpp"

using namespace kvscope;

namespace {

using tests::make;
using tests::kind_of;

void check(const ref::Method& m, const Plan& p, std::int64_t budget) {
  const auto c = ref::check_plan(p, {m.laws().prefill_budget, budget, m.laws().conservation, m.protected_tokens(p.n, budget)});
  RC_ASSERT(c.ok());
}

}  // namespace

// Integer-grid keys make equal norms (near-ties) common; the oracle must hold anyway.
RC_GTEST_PROP(KNorm, KeptNormsNeverExceedEvictedNorms, ()) {
  const auto n = *rc::gen::inRange<std::int64_t>(1, 60);
  const auto d = *rc::gen::inRange<std::int64_t>(1, 5);
  const auto kv = *rc::gen::inRange(1, 4);
  const auto budget = *rc::gen::inRange<std::int64_t>(0, n + 5);
  auto f = tests::random_layer(kv, kv, n, static_cast<int>(d), 1);
  for (int h = 0; h < kv; ++h) f.input.k[static_cast<std::size_t>(h)] = *tests::grid_matrix(n, d, 2);
  const auto m = make("knorm");
  const ref::LayerPlans lp = m->prefill(f.input, budget);
  RC_ASSERT(lp.plans.size() == static_cast<std::size_t>(kv));
  for (int h = 0; h < kv; ++h) {
    const Plan& p = lp.plans[static_cast<std::size_t>(h)];
    check(*m, p, budget);
    RC_ASSERT(p.slots() == std::min(n, budget));
    const ref::VecX norms = f.input.k[static_cast<std::size_t>(h)].rowwise().norm();
    std::vector<char> kept(static_cast<std::size_t>(n), 0);
    double max_kept = -1, min_evicted = std::numeric_limits<double>::infinity();
    for (std::int64_t j : p.token) kept[static_cast<std::size_t>(j)] = 1;
    for (std::int64_t j = 0; j < n; ++j) {
      if (kept[static_cast<std::size_t>(j)])
        max_kept = std::max(max_kept, norms[j]);
      else
        min_evicted = std::min(min_evicted, norms[j]);
    }
    RC_ASSERT(max_kept <= min_evicted);
  }
}

TEST(KNorm, ScoresAreNegativeNorms) {
  ref::MatX K(3, 2);
  K << 3, 4, 0, 1, 0, 0;
  const ref::VecX s = ref::knorm_scores(K);
  EXPECT_EQ(s[0], -5.0);
  EXPECT_EQ(s[1], -1.0);
  EXPECT_EQ(s[2], 0.0);
}

TEST(KNorm, TiesAreReportedAndBrokenTowardLowerIndex) {
  auto f = tests::random_layer(1, 1, 6, 2, 1);
  ref::MatX K(6, 2);
  K << 0, 2, 2, 0, 0, -2, 1, 0, -2, 0, 3, 0;  // norms 2 2 2 1 2 3
  f.input.k[0] = K;
  const auto m = make("knorm");
  ASSERT_NE(m->scorer(), nullptr);
  std::vector<ref::Selection> sel;
  const auto plans = ref::select_per_head(m->scorer()->score(f.input, 3), 6, {3}, "knorm", &sel);
  EXPECT_EQ(plans[0].token, (std::vector<std::int64_t>{0, 1, 3}));  // norm 1, then the two lowest-index 2s
  EXPECT_EQ(sel[0].margin, 0.0);
  EXPECT_EQ(sel[0].ties, 2);  // tokens 2 and 4 tie with the last kept
  EXPECT_EQ(m->prefill(f.input, 3).plans[0].token, plans[0].token);  // the method uses its scorer
}

TEST(KNorm, PerKvHeadIndependentOfGqaGroup) {
  const auto base = tests::random_layer(1, 2, 40, 4, 7);
  std::vector<Plan> first;
  for (int g = 1; g <= 8; ++g) {
    auto f = tests::random_layer(2 * g, 2, 40, 4, 11);
    f.input.k = base.input.k;
    const auto plans = make("knorm")->prefill(f.input, 10).plans;
    if (first.empty()) first = plans;
    for (std::size_t h = 0; h < 2; ++h) EXPECT_EQ(plans[h].token, first[h].token) << "group " << g;
  }
  EXPECT_NE(first[0].token, first[1].token);  // heads select independently
}

TEST(KNorm, SinksAndWindowAreKeptAndCounted) {
  const auto f = tests::random_layer(2, 2, 50, 4, 3);
  const auto m = make("knorm:sinks=2:window=5");
  for (const Plan& p : m->prefill(f.input, 12).plans) {
    EXPECT_EQ(p.slots(), 12);
    for (std::int64_t j : {0, 1, 45, 46, 47, 48, 49})
      EXPECT_NE(std::find(p.token.begin(), p.token.end(), j), p.token.end()) << j;
    EXPECT_TRUE(ref::check_plan(p, {ref::BudgetLaw::kExact, 12, m->laws().conservation, m->protected_tokens(50, 12)}).ok());
  }
  EXPECT_EQ(kind_of([&] { m->prefill(f.input, 6); }), ErrorKind::kImpossibleBudget);
  EXPECT_EQ(m->prefill(f.input, 7).plans[0].slots(), 7);  // exactly the protected tokens
}

TEST(KNorm, BudgetEdges) {
  const auto f = tests::random_layer(1, 1, 20, 4, 5);
  const auto m = make("knorm");
  EXPECT_EQ(m->prefill(f.input, 0).plans[0].slots(), 0);  // no protection: an empty cache is honoured
  EXPECT_EQ(m->prefill(f.input, 1).plans[0].slots(), 1);
  EXPECT_EQ(m->prefill(f.input, 20).plans[0].token, Plan::identity(20).token);
  EXPECT_EQ(m->prefill(f.input, 64).plans[0].token, Plan::identity(20).token);
  EXPECT_EQ(m->decoder(f.input, {4}), nullptr);  // prefill only
}

TEST(KNorm, SkippedLayersStayWholeUnderThePerLayerLaw) {
  auto f = tests::random_layer(2, 2, 30, 4, 6);
  const auto m = make("knorm@kvcache-factory:skip_layers=2");
  EXPECT_EQ(m->laws().allocation, ref::AllocationLaw::kPerLayer);
  EXPECT_EQ(make("knorm")->laws().allocation, ref::AllocationLaw::kUniform);
  for (int layer = 0; layer < 4; ++layer) {
    f.input.layer = layer;
    const ref::LayerPlans lp = m->prefill(f.input, 8);
    const bool skipped = layer < 2;
    EXPECT_EQ(lp.head_budgets, std::vector<std::int64_t>(2, skipped ? 30 : 8)) << layer;
    EXPECT_TRUE(ref::check_allocation(lp.head_budgets, 8, m->laws().allocation).ok());
    for (std::size_t h = 0; h < 2; ++h) {
      EXPECT_EQ(lp.plans[h].slots(), skipped ? 30 : 8);
      EXPECT_TRUE(ref::check_plan(lp.plans[h], {m->laws().prefill_budget, lp.head_budgets[h], m->laws().conservation,
                                                m->protected_tokens(30, lp.head_budgets[h])})
                      .ok());
    }
  }
  // The uniform law would reject a skipped layer's declaration: the law choice matters.
  EXPECT_FALSE(ref::check_allocation({30, 30}, 8, ref::AllocationLaw::kUniform).ok());
}

TEST(KNorm, BadConfigurationIsAUsageError) {
  for (const char* bad : {"knorm@nope", "knorm:sinks=-1", "knorm:window=x", "knorm:skip_layers=-2", "knorm:bogus=1"})
    EXPECT_EQ(kind_of([&] { make(bad); }), ErrorKind::kUsage) << bad;
}

TEST(KNorm, ReplayChecksEveryPlan) {
  traces::SynthConfig c;
  c.layers = 3;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.head_dim = 16;
  c.prompt = 64;
  c.decode = 6;
  replay::ReplayOptions o;
  o.methods = MethodSpec::parse_list("knorm,knorm@kvcache-factory:skip_layers=1,knorm:sinks=4:window=8");
  for (const char* b : {"50%", "16"}) o.budgets.push_back(Budget::parse(b));
  const auto r = replay::run_replay(traces::synth_meta(c), [&](int l) { return traces::synth_layer(c, l); }, o);
  ASSERT_EQ(r.runs.size(), 6u);
  for (const auto& run : r.runs) {
    EXPECT_EQ(run.plans_checked, c.layers * c.kv_heads * (1 + c.decode)) << run.label;
    EXPECT_GT(run.all.mean_rel_l2(), 0.0) << run.label;
  }
  // Skipping layer 0 keeps more, so it cannot lose more mass than compressing every layer.
  EXPECT_LE(r.runs[2].all.mean_mass_lost(), r.runs[0].all.mean_mass_lost());
  EXPECT_GT(r.runs[2].all.mean_kept_fraction(), r.runs[0].all.mean_kept_fraction());
}
