// H2O (ALGORITHMS.md): recent band kept; kept heavy >= evicted with ties
// reported; score mass = query rows; |cache| = min(B, n) after every decode
// step; monotone in budget; causal scores (KVCache-Factory #49 regression);
// presets, edge budgets, GQA groups 1..8, and an end-to-end replay.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <set>

#include "decode_driver.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/h2o.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/replay/replay.hpp"
#include "kvscope/traces/synth.hpp"
#include "kvscope_method_test.hpp"

using namespace kvscope;

namespace {

using tests::make;
using tests::kind_of;

// Independent group reduction of per-q-head values of token j.
double reduce(const std::vector<double>& v, const std::string& rule) {
  double s = 0, m = v.front();
  for (double x : v) s += x, m = std::max(m, x);
  return rule == "max" ? m : rule == "sum" ? s : s / static_cast<double>(v.size());
}

bool contains(const std::vector<std::int64_t>& v, std::int64_t x) { return std::find(v.begin(), v.end(), x) != v.end(); }

// Integer-valued accumulated attention per q head: many exact ties.
rc::Gen<std::vector<ref::VecX>> integer_colsums(int q_heads, std::int64_t T) {
  return rc::gen::container<std::vector<ref::VecX>>(
      static_cast<std::size_t>(q_heads),
      rc::gen::map(rc::gen::container<std::vector<int>>(static_cast<std::size_t>(T), rc::gen::inRange(0, 4)),
                   [](const std::vector<int>& v) {
                     ref::VecX x(static_cast<Eigen::Index>(v.size()));
                     for (std::size_t i = 0; i < v.size(); ++i) x[static_cast<Eigen::Index>(i)] = v[i];
                     return x;
                   }));
}

}  // namespace

RC_GTEST_PROP(H2O, PrefillKeepsRecentBandAndTheBestHeavyHittersWithTiesReported, ()) {
  const int kv = *rc::gen::inRange(1, 4), g = *rc::gen::inRange(1, 9);
  const auto T = *rc::gen::inRange<std::int64_t>(1, 60);
  const auto budget = *rc::gen::inRange<std::int64_t>(0, T + 4);
  const auto recent = *rc::gen::inRange<std::int64_t>(0, budget + 1);
  const auto rule = *rc::gen::element<std::string>("mean", "max", "sum");
  const auto score = *rc::gen::element<std::string>("sum", "per-query");
  auto f = tests::random_layer(kv * g, kv, T, 4, 11);
  f.input.attn_colsum = *integer_colsums(kv * g, T);
  const auto m = make("h2o:recent=" + std::to_string(recent) + ":gqa=" + rule + ":score=" + score);

  const ref::LayerPlans out = m->prefill(f.input, budget);
  std::vector<ref::Selection> sels;
  ref::select_per_head(m->scorer()->score(f.input, budget), T, out.head_budgets, "h2o", &sels);
  RC_ASSERT(out.plans.size() == static_cast<std::size_t>(kv));
  for (int h = 0; h < kv; ++h) {
    const auto& kept = out.plans[static_cast<std::size_t>(h)].token;
    RC_ASSERT(static_cast<std::int64_t>(kept.size()) == std::min(budget, T));
    const auto laws = m->laws();
    RC_ASSERT(ref::check_plan(out.plans[static_cast<std::size_t>(h)],
                              {laws.prefill_budget, budget, laws.conservation, m->protected_tokens(T, budget)})
                  .ok());
    for (std::int64_t j = std::max<std::int64_t>(0, T - recent); j < T; ++j) RC_ASSERT(contains(kept, j));
    // Set optimality over the non-recent candidates, by independently computed scores.
    auto s = [&](std::int64_t j) {
      std::vector<double> v;
      for (int q = h * g; q < (h + 1) * g; ++q) v.push_back(f.input.attn_colsum[static_cast<std::size_t>(q)][j]);
      return reduce(v, rule) / (score == "per-query" ? static_cast<double>(T - j) : 1.0);
    };
    double min_kept = std::numeric_limits<double>::infinity(), max_evicted = -min_kept;
    for (std::int64_t j = 0; j < T - recent; ++j) {
      if (contains(kept, j))
        min_kept = std::min(min_kept, s(j));
      else
        max_evicted = std::max(max_evicted, s(j));
    }
    RC_ASSERT(min_kept >= max_evicted);
    std::int64_t ties = 0;
    for (std::int64_t j = 0; j < T - recent; ++j) ties += !contains(kept, j) && s(j) == min_kept;
    const auto& sel = sels[static_cast<std::size_t>(h)];
    if (budget < T && budget > recent) {  // both a kept and an evicted candidate exist
      RC_ASSERT(sel.margin == min_kept - max_evicted);
      RC_ASSERT(sel.ties == ties);
    }
  }
}

RC_GTEST_PROP(H2O, ScoreMassEqualsQueryRows, ()) {
  const int kv = *rc::gen::inRange(1, 3), g = *rc::gen::inRange(1, 9);
  const auto T = *rc::gen::inRange<std::int64_t>(1, 40);
  const auto f = tests::random_layer(kv * g, kv, T, 4, *rc::gen::arbitrary<std::uint32_t>());
  // Each causal softmax row sums to 1: T rows per q head (mean keeps T, sum over the group gives g T).
  const auto mean = make("h2o:gqa=mean")->scorer()->score(f.input, T);
  const auto sum = make("h2o:gqa=sum")->scorer()->score(f.input, T);
  for (int h = 0; h < kv; ++h) {
    RC_ASSERT(std::abs(mean.per_kv_head[static_cast<std::size_t>(h)].sum() - static_cast<double>(T)) < 1e-9 * static_cast<double>(T));
    RC_ASSERT(std::abs(sum.per_kv_head[static_cast<std::size_t>(h)].sum() - static_cast<double>(g * T)) < 1e-9 * static_cast<double>(g * T));
    RC_ASSERT(mean.per_kv_head[static_cast<std::size_t>(h)].minCoeff() >= 0);
  }
}

TEST(H2O, KvcacheFactoryScoresAreCausal) {
  // Regression for KVCache-Factory #49 (fixed in 9f9aa2e): with the causal mask
  // only inside the last window, earlier queries saw later keys. Causal scores
  // of T tokens are the scores of the first T-1 plus the last row's attention.
  for (int g : {1, 4}) {
    const auto f = tests::random_layer(2 * g, 2, 50, 8, 21);
    auto prefix = f;
    for (auto& q : prefix.input.q) q = ref::MatX(q.topRows(49));
    for (auto& k : prefix.input.k) k = ref::MatX(k.topRows(49));
    for (auto& v : prefix.input.v) v = ref::MatX(v.topRows(49));
    const auto m = make("h2o@kvcache-factory");
    const auto full = m->scorer()->score(f.input, 40), head = m->scorer()->score(prefix.input, 40);
    for (int h = 0; h < 2; ++h) {
      ref::VecX last = ref::VecX::Zero(50);
      for (int q = h * g; q < (h + 1) * g; ++q)
        last += ref::window_attention(f.input.q[static_cast<std::size_t>(q)], f.input.k[static_cast<std::size_t>(h)], 1).row(0).transpose() / g;
      const ref::VecX& s = full.per_kv_head[static_cast<std::size_t>(h)];
      EXPECT_LT((s.head(49) - head.per_kv_head[static_cast<std::size_t>(h)] - last.head(49)).cwiseAbs().maxCoeff(), 1e-12);
      EXPECT_NEAR(s[49], last[49], 1e-12);  // the last key is seen by its own query only
    }
  }
}

TEST(H2O, RecordedAccumulatedAttentionIsUsed) {
  auto f = tests::random_layer(2, 1, 10, 4, 5);
  f.input.attn_colsum = {ref::VecX::Zero(10), ref::VecX::Zero(10)};
  f.input.attn_colsum[0][3] = 5;
  f.input.attn_colsum[1][6] = 4;
  EXPECT_EQ(make("h2o:recent=1")->prefill(f.input, 3).plans[0].token, (std::vector<std::int64_t>{3, 6, 9}));
  EXPECT_EQ(make("h2o:recent=1:gqa=max")->prefill(f.input, 2).plans[0].token, (std::vector<std::int64_t>{3, 9}));
}

TEST(H2O, ProtectedRecentTokensWinTiesAndHeavyTiesKeepLowerIndices) {
  auto f = tests::random_layer(1, 1, 10, 4, 6);
  f.input.attn_colsum = {ref::VecX::Constant(10, 1.0)};
  // Lower index first on ties would pick 0..3; the recent band 8, 9 must win anyway.
  EXPECT_EQ(make("h2o:recent=2")->prefill(f.input, 4).plans[0].token, (std::vector<std::int64_t>{0, 1, 8, 9}));
  EXPECT_EQ(make("h2o:recent=0.5")->prefill(f.input, 5).plans[0].token, (std::vector<std::int64_t>{0, 1, 2, 8, 9}));
  EXPECT_EQ(make("h2o@kvpress")->prefill(f.input, 4).plans[0].token, (std::vector<std::int64_t>{6, 7, 8, 9}));  // per-query: later tokens win
}

TEST(H2O, MonotoneInBudgetWithoutTies) {
  const auto f = tests::random_layer(8, 2, 80, 8, 7);
  for (const char* spec : {"h2o@kvpress", "h2o@kvcache-factory", "h2o:recent=4:gqa=max"}) {
    const auto m = make(spec);
    std::vector<Plan> prev = m->prefill(f.input, 32).plans;
    for (std::int64_t b = 33; b <= 80; ++b) {
      const std::vector<Plan> next = m->prefill(f.input, b).plans;
      for (std::size_t h = 0; h < next.size(); ++h)
        EXPECT_TRUE(std::includes(next[h].token.begin(), next[h].token.end(), prev[h].token.begin(), prev[h].token.end()))
            << spec << " budget " << b << " head " << h;
      prev = next;
    }
  }
}

TEST(H2O, EdgeBudgets) {
  const auto f = tests::random_layer(4, 2, 30, 4, 8);
  for (const char* spec : {"h2o", "h2o@kvpress", "h2o@kvcache-factory"})
    for (std::int64_t b : {32, 45})  // n <= budget: the identity
      for (const Plan& p : make(spec)->prefill(f.input, b).plans) EXPECT_EQ(p.token, Plan::identity(30).token) << spec;
  EXPECT_EQ(make("h2o")->prefill(f.input, 30).plans[0].token, Plan::identity(30).token);
  EXPECT_EQ(make("h2o")->prefill(f.input, 0).plans[0].slots(), 0);
  EXPECT_EQ(make("h2o")->prefill(f.input, 1).plans[0].slots(), 1);
  EXPECT_EQ(make("h2o:recent=1")->prefill(f.input, 1).plans[0].token, (std::vector<std::int64_t>{29}));
  EXPECT_EQ(make("h2o@kvpress")->prefill(f.input, 0).plans[1].slots(), 0);
  // KVCache-Factory protects a 32-token window: a smaller budget cannot hold it.
  EXPECT_EQ(kind_of([&] { make("h2o@kvcache-factory")->prefill(f.input, 31); }), ErrorKind::kImpossibleBudget);
  EXPECT_EQ(kind_of([&] { make("h2o@kvcache-factory")->protected_tokens(100, 20); }), ErrorKind::kImpossibleBudget);
}

TEST(H2O, BadConfigurationIsAUsageError) {
  for (const char* bad : {"h2o@nope", "h2o:bogus=1", "h2o:recent=-1", "h2o:recent=1.5", "h2o:recent=x", "h2o:gqa=median",
                          "h2o:score=avg", "h2o:decode=maybe"})
    EXPECT_EQ(kind_of([&] { make(bad)->protected_tokens(10, 10); }), ErrorKind::kUsage) << bad;
}

TEST(H2O, PresetsPinTheirBehaviour) {
  const auto f = tests::random_layer(2, 1, 100, 4, 9);
  EXPECT_NE(make("h2o@paper")->decoder(f.input, {10}), nullptr);
  EXPECT_EQ(make("h2o@kvpress")->decoder(f.input, {10}), nullptr);
  EXPECT_EQ(make("h2o@kvcache-factory")->decoder(f.input, {40}), nullptr);
  EXPECT_EQ(make("h2o@paper")->protected_tokens(100, 11), (std::vector<std::int64_t>{95, 96, 97, 98, 99}));
  EXPECT_EQ(make("h2o@kvcache-factory")->protected_tokens(100, 40).size(), 32u);
  EXPECT_TRUE(make("h2o@kvpress")->protected_tokens(100, 40).empty());
  EXPECT_EQ(make("h2o@paper")->laws().decode_budget, ref::BudgetLaw::kExact);
  EXPECT_EQ(make("h2o@kvpress")->laws().decode_budget, ref::BudgetLaw::kNone);
  EXPECT_EQ(make("h2o")->name(), "h2o@paper:decode=evict:gqa=mean:recent=0.5:score=sum");
}

RC_GTEST_PROP(H2O, DecodeKeepsBudgetRecentBandAndHeavyHittersWithExactMassBookkeeping, ()) {
  const int kv = *rc::gen::inRange(1, 3), g = *rc::gen::inRange(1, 9);
  const auto T = *rc::gen::inRange<std::int64_t>(2, 30), S = *rc::gen::inRange<std::int64_t>(1, 16);
  const auto budget = *rc::gen::inRange<std::int64_t>(0, T + S + 2);
  const auto rule = *rc::gen::element<std::string>("mean", "max", "sum");
  const auto score = *rc::gen::element<std::string>("sum", "per-query");
  const auto recent = budget == 0 ? std::string("0") : *rc::gen::element<std::string>("0.5", "0", "1", "0.25");
  const auto L = tests::random_decode_layer(kv * g, kv, T, S, 8, *rc::gen::arbitrary<std::uint32_t>(), 1.5);
  const auto m = make("h2o@paper:gqa=" + rule + ":score=" + score + ":recent=" + recent);
  const int qh = kv * g;
  // Per q head, the accumulated attention of every token as of the last step.
  std::vector<ref::VecX> prev;
  for (int h = 0; h < qh; ++h) prev.push_back(ref::accumulated_attention(L.prefill.input, h, false));
  tests::drive(*m, L, budget, [&](const tests::StepView& v) {
    const auto& dec = dynamic_cast<const ref::H2ODecoder&>(*v.policy);
    const std::int64_t n = T + v.step + 1;
    for (int h = 0; h < qh; ++h) {
      const auto& att = v.attended_tokens[static_cast<std::size_t>(h / g)];
      // Mass bookkeeping: the attended tokens gained exactly this query's row (sums to 1).
      double before = 0, after = 0;
      for (std::int64_t j : att) {
        if (j < n - 1) before += prev[static_cast<std::size_t>(h)][j];
        after += dec.accumulated(h, j);
      }
      RC_ASSERT(std::abs(after - before - 1.0) < 1e-9 * std::max(1.0, after));
      prev[static_cast<std::size_t>(h)] = ref::VecX(n);
      for (std::int64_t j = 0; j < n; ++j) prev[static_cast<std::size_t>(h)][j] = dec.accumulated(h, j);
    }
    for (int k = 0; k < kv; ++k) {
      const auto& att = v.attended_tokens[static_cast<std::size_t>(k)];
      const auto& kept = (*v.caches)[static_cast<std::size_t>(k)].plan.token;
      RC_ASSERT(static_cast<std::int64_t>(kept.size()) == std::min(budget, n));
      if (att.size() == kept.size()) continue;
      RC_ASSERT(att.size() == kept.size() + 1);  // one token in, one out
      auto s = [&](std::int64_t j) {
        std::vector<double> x;
        for (int q = k * g; q < (k + 1) * g; ++q) x.push_back(dec.accumulated(q, j));
        return reduce(x, rule) / (score == "per-query" ? static_cast<double>(n - j) : 1.0);
      };
      const auto rec = static_cast<std::int64_t>(m->protected_tokens(n, budget).size());
      std::int64_t evicted = -1;
      for (std::int64_t j : att)
        if (!contains(kept, j)) evicted = j;
      RC_ASSERT(evicted >= 0 && evicted < n - rec);  // never from the recent band
      for (std::int64_t j : kept)
        if (j < n - rec) RC_ASSERT(s(j) >= s(evicted));
      RC_ASSERT(dec.last_selections()[static_cast<std::size_t>(k)].margin >= 0);
    }
  });
}

TEST(H2O, DecodeWithoutEvictionAccumulatesEveryQueryRow) {
  // Budget covering everything: the score mass of each q head is the number of rows n.
  const auto L = tests::random_decode_layer(4, 2, 12, 10, 8, 3);
  const auto m = make("h2o");
  tests::drive(*m, L, 100, [&](const tests::StepView& v) {
    const auto& dec = dynamic_cast<const ref::H2ODecoder&>(*v.policy);
    const std::int64_t n = 12 + v.step + 1;
    for (int h = 0; h < 4; ++h) {
      double mass = 0;
      for (std::int64_t j = 0; j < n; ++j) mass += dec.accumulated(h, j);
      EXPECT_NEAR(mass, static_cast<double>(n), 1e-9);
      EXPECT_GT(dec.accumulated(h, n - 1), 0.0);  // the new token entered with its own attention
    }
  });
}

TEST(H2O, DecodeEvictsTheLowestScoringOldTokenAfterAttending) {
  // Hand-made: token 1 collects no attention (its key points away from every query).
  auto L = tests::random_decode_layer(1, 1, 6, 1, 4, 4);
  for (auto* M : {&L.prefill.input.q[0], &L.decode_q[0]}) M->setConstant(1.0);
  L.K[0].setZero();
  L.K[0].row(1).setConstant(-20.0);
  L.prefill.input.k[0] = L.K[0].topRows(6);
  const auto m = make("h2o:recent=2");
  const auto caches = tests::drive(*m, L, 5, [&](const tests::StepView& v) {
    EXPECT_EQ(v.attended_tokens[0], (std::vector<std::int64_t>{0, 2, 3, 4, 5, 6}));  // budget + the new token
  });
  // Prefill: recent 4, 5 plus the best three of 0..3, so 1 goes. The decode query
  // spreads 1/6 over 0, 2..6; then recent = 5, 6 and token 4, seen by the fewest
  // rows (1/4 + 1/5 + 1/6), has the lowest sum among 0, 2, 3, 4.
  EXPECT_EQ(caches[0].plan.token, (std::vector<std::int64_t>{0, 2, 3, 5, 6}));
}

TEST(H2O, ReplayRunsEveryPresetUnderThePlanChecker) {
  traces::SynthConfig c;
  c.layers = 2;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.head_dim = 16;
  c.prompt = 96;
  c.decode = 12;
  replay::ReplayOptions o;
  o.methods = MethodSpec::parse_list(
      "h2o,h2o@kvcache-factory,h2o@kvpress,h2o@paper:score=per-query:gqa=max,h2o@kvpress:decode=evict,"
      "h2o:recent=0");
  for (const char* b : {"50%", "40", "1"}) o.budgets.push_back(Budget::parse(b));
  const TraceMeta meta = traces::synth_meta(c);
  o.budgets.pop_back();  // 1 < kvcache-factory's window: checked as an error below
  const auto r = replay::run_replay(meta, [&](int l) { return traces::synth_layer(c, l); }, o);
  ASSERT_EQ(r.runs.size(), 12u);
  for (const auto& run : r.runs) {
    EXPECT_EQ(run.plans_checked, c.layers * c.kv_heads * (1 + c.decode)) << run.label;
    EXPECT_GT(run.all.mean_rel_l2(), 0.0) << run.label;  // something was evicted
  }
  o.budgets = {Budget::parse("1")};
  o.methods = MethodSpec::parse_list("h2o@kvcache-factory");
  EXPECT_EQ(kind_of([&] { replay::run_replay(meta, [&](int l) { return traces::synth_layer(c, l); }, o); }),
            ErrorKind::kImpossibleBudget);
  o.methods = MethodSpec::parse_list("h2o,h2o@kvpress");
  EXPECT_NO_THROW(replay::run_replay(meta, [&](int l) { return traces::synth_layer(c, l); }, o));
}
