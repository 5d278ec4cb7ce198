// TOVA (ALGORITHMS.md): one token set for every kv head of a layer; |cache| =
// min(B, n) after every reduce; scores (last query, mean over all q heads) sum
// to 1; kept >= evicted with ties; the current token competes (paper) or is
// forced kept (kvpress); edge budgets, GQA groups 1..8, an end-to-end replay.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <algorithm>

#include "decode_driver.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/tova.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/replay/replay.hpp"
#include "kvscope/traces/synth.hpp"
#include "kvscope_test_gen.hpp"
#include "kvscope_method_test.hpp"

using namespace kvscope;

namespace {

using tests::make;
using tests::kind_of;

bool contains(const std::vector<std::int64_t>& v, std::int64_t x) { return std::find(v.begin(), v.end(), x) != v.end(); }

// min kept score >= max evicted score over the tokens in `candidates`.
bool set_optimal(const std::vector<std::int64_t>& candidates, const std::vector<std::int64_t>& kept,
                 const std::function<double(std::int64_t)>& s) {
  double min_kept = std::numeric_limits<double>::infinity(), max_evicted = -min_kept;
  for (std::int64_t j : candidates) {
    if (contains(kept, j))
      min_kept = std::min(min_kept, s(j));
    else
      max_evicted = std::max(max_evicted, s(j));
  }
  return min_kept >= max_evicted;
}

}  // namespace

RC_GTEST_PROP(TOVA, PrefillKeepsOneTopBSetForEveryKvHead, ()) {
  const int kv = *rc::gen::inRange(1, 4), g = *rc::gen::inRange(1, 9);
  const auto T = *rc::gen::inRange<std::int64_t>(1, 40);
  const auto budget = *rc::gen::inRange<std::int64_t>(0, T + 3);
  const bool kvpress = *rc::gen::arbitrary<bool>();
  auto f = tests::random_layer(kv * g, kv, T, 4, 1);
  // Coarse grid values (steps of 1/16 in [-1, 1]): equal logits, tied scores.
  for (auto& q : f.input.q) q = *tests::grid_matrix(T, 4, 1);
  for (auto& k : f.input.k) k = *tests::grid_matrix(T, 4, 1);
  if (kvpress && budget == 0) {
    RC_ASSERT(kind_of([&] { make("tova@kvpress")->prefill(f.input, 0); }) == ErrorKind::kImpossibleBudget);
    return;
  }
  const auto m = make(kvpress ? "tova@kvpress" : "tova@paper");
  const auto plans = m->prefill(f.input, budget).plans;
  const ref::VecX s = ref::tova_scores(f.input);
  RC_ASSERT(std::abs(s.sum() - 1.0) < 1e-12);
  RC_ASSERT(s.minCoeff() >= 0);
  RC_ASSERT(plans.size() == static_cast<std::size_t>(kv));
  const auto& kept = plans[0].token;
  RC_ASSERT(static_cast<std::int64_t>(kept.size()) == std::min(budget, T));
  for (const Plan& p : plans) RC_ASSERT(p.token == kept);
  if (kvpress) RC_ASSERT(contains(kept, T - 1));
  RC_ASSERT(set_optimal(ref::index_range(0, kvpress ? T - 1 : T), kept, [&](std::int64_t j) { return s[j]; }));
}

TEST(TOVA, ScoreIsTheLastQueryAttentionAveragedOverAllQHeads) {
  for (int g : {1, 2, 8}) {
    const auto f = tests::random_layer(2 * g, 2, 25, 8, 13);
    ref::VecX want = ref::VecX::Zero(25);
    for (int h = 0; h < 2 * g; ++h) {
      const auto& K = f.input.k[static_cast<std::size_t>(h / g)];
      want += ref::attend(f.input.q[static_cast<std::size_t>(h)].row(24).transpose(), K, K).probs / (2.0 * g);
    }
    EXPECT_LT((ref::tova_scores(f.input) - want).cwiseAbs().maxCoeff(), 1e-12) << "group " << g;
  }
}

TEST(TOVA, TiesKeepLowerIndicesAndTheForcedLastTokenWins) {
  auto f = tests::random_layer(2, 1, 8, 4, 14);
  for (auto& q : f.input.q) q.setZero();  // uniform attention: every score 1/8
  EXPECT_EQ(make("tova")->prefill(f.input, 3).plans[0].token, (std::vector<std::int64_t>{0, 1, 2}));
  EXPECT_EQ(make("tova@kvpress")->prefill(f.input, 3).plans[0].token, (std::vector<std::int64_t>{0, 1, 7}));
}

TEST(TOVA, EdgeBudgetsAndPresets) {
  const auto f = tests::random_layer(4, 2, 30, 4, 15);
  for (const char* spec : {"tova", "tova@kvpress"})
    for (const Plan& p : make(spec)->prefill(f.input, 30).plans) EXPECT_EQ(p.token, Plan::identity(30).token) << spec;
  EXPECT_EQ(make("tova")->prefill(f.input, 0).plans[1].slots(), 0);
  EXPECT_EQ(make("tova")->prefill(f.input, 1).plans[0].slots(), 1);
  EXPECT_EQ(make("tova@kvpress")->prefill(f.input, 1).plans[0].token, (std::vector<std::int64_t>{29}));
  EXPECT_EQ(kind_of([&] { make("tova@kvpress")->protected_tokens(30, 0); }), ErrorKind::kImpossibleBudget);
  EXPECT_NE(make("tova")->decoder(f.input, {10, 10}), nullptr);
  EXPECT_EQ(make("tova@kvpress")->decoder(f.input, {10, 10}), nullptr);
  EXPECT_EQ(make("tova")->laws().decode_budget, ref::BudgetLaw::kExact);
  EXPECT_EQ(make("tova")->name(), "tova@paper:decode=evict:keep_last=false");
  for (const char* bad : {"tova@nope", "tova:keep_last=maybe", "tova:decode=x", "tova:budget=3"})
    EXPECT_EQ(kind_of([&] { make(bad)->protected_tokens(10, 5); }), ErrorKind::kUsage) << bad;
}

RC_GTEST_PROP(TOVA, DecodeReducesToBudgetWithOneSetPerLayer, ()) {
  const int kv = *rc::gen::inRange(1, 4), g = *rc::gen::inRange(1, 9);
  const auto T = *rc::gen::inRange<std::int64_t>(1, 30), S = *rc::gen::inRange<std::int64_t>(1, 16);
  const bool keep_last = *rc::gen::arbitrary<bool>();
  const auto budget = *rc::gen::inRange<std::int64_t>(keep_last ? 1 : 0, T + S + 2);
  const auto L = tests::random_decode_layer(kv * g, kv, T, S, 8, *rc::gen::arbitrary<std::uint32_t>(), 2.0);
  const auto m = make(std::string("tova@paper:keep_last=") + (keep_last ? "true" : "false"));
  tests::drive(*m, L, budget, [&](const tests::StepView& v) {
    const std::int64_t n = T + v.step + 1;
    const auto& att = v.attended_tokens[0];
    const auto& kept = (*v.caches)[0].plan.token;
    for (int k = 0; k < kv; ++k) {
      RC_ASSERT(v.attended_tokens[static_cast<std::size_t>(k)] == att);
      RC_ASSERT((*v.caches)[static_cast<std::size_t>(k)].plan.token == kept);
    }
    RC_ASSERT(static_cast<std::int64_t>(kept.size()) == std::min(budget, n));
    // This step's score, computed here from the probabilities: a distribution.
    ref::VecX s = ref::VecX::Zero(n);
    for (int h = 0; h < kv * g; ++h)
      for (std::size_t i = 0; i < att.size(); ++i) s[att[i]] += (*v.probs)[static_cast<std::size_t>(h)][static_cast<Eigen::Index>(i)] / (kv * g);
    RC_ASSERT(std::abs(s.sum() - 1.0) < 1e-12);
    std::vector<std::int64_t> candidates = att;
    if (keep_last) {
      RC_ASSERT(contains(kept, n - 1));
      candidates.pop_back();
    }
    RC_ASSERT(set_optimal(candidates, kept, [&](std::int64_t j) { return s[j]; }));
  });
}

TEST(TOVA, TheCurrentTokenCompetesUnlessForcedKept) {
  // The decoded token's key points away from the query: it gets ~0 attention.
  auto L = tests::random_decode_layer(2, 1, 4, 1, 4, 16);
  for (auto& q : L.prefill.input.q) q.setConstant(1.0);
  for (auto& q : L.decode_q) q.setConstant(1.0);
  L.K[0].setZero();
  L.K[0].row(4).setConstant(-20.0);
  L.prefill.input.k[0] = L.K[0].topRows(4);
  EXPECT_EQ(tests::drive(*make("tova"), L, 4)[0].plan.token, (std::vector<std::int64_t>{0, 1, 2, 3}));
  // Forced kept: the old tokens tie at 1/4 and the lowest index wins, so 3 goes.
  EXPECT_EQ(tests::drive(*make("tova:keep_last=true"), L, 4)[0].plan.token, (std::vector<std::int64_t>{0, 1, 2, 4}));
  EXPECT_EQ(tests::drive(*make("tova@kvpress"), L, 4)[0].plan.token, (std::vector<std::int64_t>{0, 1, 2, 3, 4}));  // grows
}

TEST(TOVA, ReplayRunsEveryPresetUnderThePlanChecker) {
  traces::SynthConfig c;
  c.layers = 2;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.head_dim = 16;
  c.prompt = 96;
  c.decode = 12;
  replay::ReplayOptions o;
  o.methods = MethodSpec::parse_list("tova,tova@kvpress,tova@kvpress:decode=evict,tova:keep_last=true");
  for (const char* b : {"50%", "1"}) o.budgets.push_back(Budget::parse(b));
  const auto r = replay::run_replay(traces::synth_meta(c), [&](int l) { return traces::synth_layer(c, l); }, o);
  ASSERT_EQ(r.runs.size(), 8u);
  for (const auto& run : r.runs) {
    EXPECT_EQ(run.plans_checked, c.layers * c.kv_heads * (1 + c.decode)) << run.label;
    EXPECT_GT(run.all.mean_rel_l2(), 0.0) << run.label;
  }
}
