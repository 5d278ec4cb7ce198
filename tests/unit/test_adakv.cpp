// AdaKV: Σ_h B_h = H·C ± H (exact for kvpress), the floor holds, the base's
// window is kept in every head, each head keeps its own top-B_h, normalisation
// changes the allocation as the authors' formula says, and the replay engine's
// checker accepts SnapKV, PyramidKV and AdaKV plans at every step.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>

#include "kvscope/reference/methods/adakv.hpp"
#include "kvscope/reference/plan_checker.hpp"
#include "kvscope/replay/replay.hpp"
#include "snapkv_test_support.hpp"

using namespace kvscope;
using namespace kvscope::tests::snap;

namespace {

ref::LayerScores fake_scores(const std::vector<std::vector<double>>& heads) {
  ref::LayerScores s;
  for (const auto& h : heads) s.per_kv_head.push_back(Eigen::Map<const ref::VecX>(h.data(), static_cast<Eigen::Index>(h.size())));
  return s;
}

ref::AdaKVOptions opts(double alpha, bool normalize, ref::AdaAllocation a = ref::AdaAllocation::kOriginal) {
  return {alpha, normalize, a};
}

}  // namespace

RC_GTEST_PROP(AdaKV, HeadSharedBudgetsFloorWindowAndPerHeadOptimality, ()) {
  const int kv = *rc::gen::inRange(1, 5), G = *rc::gen::inRange(1, 9);
  const auto T = *rc::gen::inRange<std::int64_t>(1, 60);
  const auto f = gen_layer(kv * G, kv, T, 2 * *rc::gen::inRange(1, 4), *rc::gen::arbitrary<bool>());
  const bool kvpress = *rc::gen::arbitrary<bool>();
  const auto w = *rc::gen::inRange<std::int64_t>(0, 9);
  const double alpha = *rc::gen::element(0.0, 0.1, 0.2, 0.5, 1.0);
  const std::string spec = std::string(kvpress ? "adakv@kvpress" : "adakv@paper") + ":base=snapkv@" +
                           (kvpress ? "kvpress" : "adakv") + "/window=" + std::to_string(w) +
                           ":alpha=" + std::to_string(alpha) + ":normalize=" + (*rc::gen::arbitrary<bool>() ? "true" : "false");
  const auto C = *rc::gen::inRange<std::int64_t>(0, T + 3);
  const auto m = make(spec);
  const auto P = std::min(w, T);
  if (!kvpress && C < P) {  // snapkv@adakv: small_budget=error
    RC_ASSERT(kind_of([&] { m->prefill(f.input, C); }) == ErrorKind::kImpossibleBudget);
    return;
  }
  const ref::LayerPlans out = m->prefill(f.input, C);
  const ref::LayerScores s = make("snapkv@" + std::string(kvpress ? "kvpress" : "adakv") + ":window=" +
                                  std::to_string(w))->scorer()->score(f.input, C);
  const auto H = static_cast<std::int64_t>(kv);
  std::int64_t sum = 0;
  for (auto b : out.head_budgets) sum += b;
  RC_ASSERT(std::abs(sum - H * C) <= H);
  RC_ASSERT(ref::check_allocation(out.head_budgets, C, ref::AllocationLaw::kHeadShared).ok());
  const bool shares = C < T && C > static_cast<std::int64_t>(s.protected_tokens.size());
  if (kvpress) RC_ASSERT(sum == H * C);  // global pruning of exactly H (T - C) entries
  if (shares) RC_TAG(*std::min_element(out.head_budgets.begin(), out.head_budgets.end()) !=
                             *std::max_element(out.head_budgets.begin(), out.head_budgets.end())
                         ? "heads differ"
                         : "heads equal");
  for (std::size_t h = 0; h < out.plans.size(); ++h) {
    const auto b = out.head_budgets[h];
    const Plan& p = out.plans[h];
    RC_ASSERT(b <= std::max(T, C));
    if (shares) {
      const auto Pn = static_cast<std::int64_t>(s.protected_tokens.size());
      if (kvpress) RC_ASSERT(b >= std::max(Pn, static_cast<std::int64_t>(static_cast<double>(C) * alpha)));
      else RC_ASSERT(b - Pn >= static_cast<std::int64_t>(static_cast<double>(C - Pn) * alpha));
      if (alpha == 1.0) RC_ASSERT(b == C);  // the floor is the whole budget: uniform
    }
    RC_ASSERT(p.slots() == std::min(b, T));
    RC_ASSERT(contains_all(p.token, s.protected_tokens));  // the window in every head
    RC_ASSERT(optimality(p.token, s.per_kv_head[h], s.protected_tokens).ok);
    RC_ASSERT(ref::check_plan(p, {ref::BudgetLaw::kExact, b, ref::ConservationLaw::kEviction,
                                  m->protected_tokens(T, b)}).ok());
  }
}

TEST(AdaKV, NormalizationReweightsHeadsByTheirTopBMass) {
  // B = 2 per head, 4 slots to share, alpha 0 (no floor), no protected tokens.
  const auto s = fake_scores({{0.5, 0.4, 0.3, 0.3, 0.3, 0.3}, {0.35, 0.2, 0, 0, 0, 0}});
  // Raw scores: the global top 4 are 0.5 0.4 (head 0) 0.35 (head 1) 0.3 (head 0).
  EXPECT_EQ(ref::adakv_budgets(s, 6, 2, opts(0, false)), (std::vector<std::int64_t>{3, 1}));
  // Normalised: head 0 x 0.9/2.1, head 1 x 1: 0.35 0.214 0.2 0.171 -> two each.
  EXPECT_EQ(ref::adakv_budgets(s, 6, 2, opts(0, true)), (std::vector<std::int64_t>{2, 2}));
  // The floor: alpha 0.5 gives floor(1) + round(c_h * 0.5): (3, 1) -> (round(2.5)=2, round(1.5)=2).
  EXPECT_EQ(ref::adakv_budgets(s, 6, 2, opts(0.5, false)), (std::vector<std::int64_t>{2, 2}));
  // kvpress: n_safe = int(2 * 0.5) = 1 per head, then the global top 2 of the rest: 0.4, 0.3.
  EXPECT_EQ(ref::adakv_budgets(s, 6, 2, opts(0.5, false, ref::AdaAllocation::kKvpress)), (std::vector<std::int64_t>{3, 1}));
  // Budget covering the prompt: nothing to share.
  EXPECT_EQ(ref::adakv_budgets(s, 6, 6, opts(0, true)), (std::vector<std::int64_t>{6, 6}));
}

TEST(AdaKV, ProtectedTokensAreAddedToEveryHead) {
  auto s = fake_scores({{9, 8, 7, 0, 0}, {1, 1, 1, 0, 0}});
  s.protected_tokens = {3, 4};
  // C = 4: B = 2 past slots per head, 4 shared; head 0 scores highest everywhere.
  EXPECT_EQ(ref::adakv_budgets(s, 5, 4, opts(0, false)), (std::vector<std::int64_t>{5, 3}));
  const auto plans = ref::select_per_head(s, 5, {5, 3}, "adakv");
  EXPECT_EQ(plans[0].token, (std::vector<std::int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(plans[1].token, (std::vector<std::int64_t>{0, 3, 4}));  // ties: lower index first
}

// The original allocation against its definition: flatten every head's
// (normalised) candidate scores at h * T + j, stable-sort them best first,
// count the first H·B per head, then round. Heavy ties, signed zeros, protected
// tokens, budgets at the edges, with and without normalisation.
TEST(AdaKV, OriginalCountsEqualAStableSortOfTheFlatScores) {
  std::mt19937_64 rng(20261205);
  std::printf("seed 20261205\n");
  for (int trial = 0; trial < 200; ++trial) {
    const int H = 1 + static_cast<int>(rng() % 6);
    const auto T = static_cast<std::int64_t>(1 + rng() % 40);
    std::vector<std::vector<double>> heads(static_cast<std::size_t>(H), std::vector<double>(static_cast<std::size_t>(T)));
    for (auto& h : heads)
      for (double& x : h)
        x = trial % 3 == 0   ? static_cast<double>(rng() % 5) * 0.25 - 0.25                      // ties, negatives
            : trial % 3 == 1 ? (rng() % 2 ? -0.0 : 0.0) + static_cast<double>(rng() % 2) * 1e-300  // zeros, subnormal
                             : std::ldexp(static_cast<double>(rng() % 1000), -static_cast<int>(rng() % 30));
    auto s = fake_scores(heads);
    for (std::int64_t j = T - static_cast<std::int64_t>(rng() % 3); j < T; ++j)
      if (j >= 0) s.protected_tokens.push_back(j);
    const auto P = static_cast<std::int64_t>(s.protected_tokens.size());
    const auto C = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(T + 2));
    const bool normalize = rng() % 2 != 0;
    const double alpha = (trial % 4) * 0.2;
    if (C >= T || C <= P) continue;  // nothing shared (covered above)
    const std::int64_t B = C - P;
    std::vector<std::int64_t> cand, flat;
    for (std::int64_t j = 0; j < T - P; ++j) cand.push_back(j);
    std::vector<double> value(static_cast<std::size_t>(H * T), 0.0);
    for (int h = 0; h < H; ++h) {
      std::vector<double> v(heads[static_cast<std::size_t>(h)].begin(), heads[static_cast<std::size_t>(h)].begin() + (T - P));
      std::sort(v.begin(), v.end(), std::greater<>());
      double top = 0, all = 0, ratio = 1;
      for (std::size_t i = 0; i < v.size(); ++i) (i < static_cast<std::size_t>(B) ? top : all) += v[i];
      all += top;
      if (normalize && all > 0 && std::isfinite(top / all)) ratio = top / all;
      for (std::int64_t j : cand) {
        value[static_cast<std::size_t>(h * T + j)] = heads[static_cast<std::size_t>(h)][static_cast<std::size_t>(j)] * ratio;
        flat.push_back(h * T + j);
      }
    }
    std::stable_sort(flat.begin(), flat.end(), [&](std::int64_t a, std::int64_t b) {
      return value[static_cast<std::size_t>(a)] > value[static_cast<std::size_t>(b)];
    });
    std::vector<std::int64_t> counts(static_cast<std::size_t>(H), 0);
    for (std::int64_t i = 0; i < std::min<std::int64_t>(H * B, static_cast<std::int64_t>(flat.size())); ++i)
      ++counts[static_cast<std::size_t>(flat[static_cast<std::size_t>(i)] / T)];
    std::vector<std::int64_t> want = ref::adakv_round_budgets(counts, B, alpha, T - P);
    for (auto& b : want) b += P;
    EXPECT_EQ(ref::adakv_budgets(s, T, C, opts(alpha, normalize)), want)
        << "trial " << trial << ", H " << H << ", T " << T << ", C " << C << ", P " << P << ", normalize " << normalize;
  }
}

TEST(AdaKV, OriginalRoundingAndTheLawRepair) {
  // round(c (1 - 0.2) + floor(0.2 * 10)) with Σ c = H·B: exact here.
  EXPECT_EQ(ref::adakv_round_budgets({10, 10}, 10, 0.2, 100), (std::vector<std::int64_t>{10, 10}));
  EXPECT_EQ(ref::adakv_round_budgets({20, 0}, 10, 0.2, 100), (std::vector<std::int64_t>{18, 2}));
  // H = 5, B = 14: floor(2.8) = 2 loses 0.8 per head and every c_h * 0.8 rounds
  // down 0.4: 8 12 16 12 16 = 64 < 70 - 5; the largest remainder (head 0 on a tie) gets one back.
  EXPECT_EQ(ref::adakv_round_budgets({8, 13, 18, 13, 18}, 14, 0.2, 100), (std::vector<std::int64_t>{9, 12, 16, 12, 16}));
  // torch.round is half to even: alpha 0.5, B = 5, floor 2: 5 -> 4.5 -> 4; 7 -> 5.5 -> 6; 3 -> 3.5 -> 4.
  EXPECT_EQ(ref::adakv_round_budgets({5, 5}, 5, 0.5, 100), (std::vector<std::int64_t>{4, 4}));
  EXPECT_EQ(ref::adakv_round_budgets({7, 3}, 5, 0.5, 100), (std::vector<std::int64_t>{6, 4}));
}

TEST(AdaKV, BaseSpellingsAndErrors) {
  const auto f = tests::random_layer(4, 2, 40, 4, 60);
  const auto m = make("adakv:base=snapkv@kvpress/window=8");
  EXPECT_EQ(m->protected_tokens(40, 20), ref::index_range(32, 40));
  const auto out = m->prefill(f.input, 20);
  for (const Plan& p : out.plans) EXPECT_TRUE(contains_all(p.token, ref::index_range(32, 40)));
  EXPECT_EQ(make("adakv")->name(), make("adakv@paper")->name());
  EXPECT_NE(make("adakv@kvpress")->name().find("base=snapkv@kvpress"), std::string::npos);
  for (const char* bad : {"adakv:base=full", "adakv:base=pyramidkv", "adakv:base=streaming_llm", "adakv:base=nope",
                          "adakv:base=snapkv@nope", "adakv:base=adakv", "adakv:base=snapkv/kernel=4",
                          "adakv:alpha=1.5", "adakv:alpha=-0.1", "adakv:alpha=x", "adakv:normalize=perhaps",
                          "adakv:allocation=greedy"})
    EXPECT_EQ(kind_of([&] { make(bad); }), ErrorKind::kUsage) << bad;
  // The base's own budget rule: the paper base (snapkv@adakv, w 32) cannot go below its window.
  EXPECT_EQ(kind_of([&] { make("adakv")->prefill(f.input, 20); }), ErrorKind::kImpossibleBudget);
  for (const Plan& p : make("adakv")->prefill(f.input, 40).plans) EXPECT_EQ(p.token, Plan::identity(40).token);
  EXPECT_EQ(make("adakv")->decoder(f.input, {20, 20}), nullptr);
  EXPECT_EQ(make("adakv")->laws().allocation, ref::AllocationLaw::kHeadShared);
}

TEST(AdaKV, HeadsWithConcentratedAttentionGiveSlotsToDiffuseOnes) {
  // kv head 0's queries all point at key 3; kv head 1 is diffuse (zero keys).
  auto f = tests::random_layer(2, 2, 64, 4, 61);
  f.input.k[1].setZero();
  for (Eigen::Index t = 0; t < 64; ++t) f.input.q[0].row(t) = 8.0 * f.input.k[0].row(3).normalized();
  const auto out = make("adakv:base=snapkv@adakv/window=4/pooling=none:normalize=false")->prefill(f.input, 20);
  EXPECT_LT(out.head_budgets[0] + 10, out.head_budgets[1]);
  EXPECT_TRUE(ref::check_allocation(out.head_budgets, 20, ref::AllocationLaw::kHeadShared).ok());
}

TEST(SnapPyramidAda, ReplayEngineAcceptsEveryPlanAtEveryStep) {
  TraceMeta meta;
  meta.layers = 3;
  meta.q_heads = 4;
  meta.kv_heads = 2;
  meta.head_dim = 8;
  meta.prompt_len = 80;
  meta.decode_steps = 3;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> g;
  auto tensor = [&](std::int64_t h, std::int64_t t) {
    Tensor x({h, t, meta.head_dim});
    for (float& v : x.data) v = g(rng);
    return x;
  };
  std::vector<LayerData> layers(3);
  for (auto& l : layers) {
    l.prefill_q = tensor(4, 80), l.prefill_k = tensor(2, 80), l.prefill_v = tensor(2, 80);
    l.decode_q = tensor(4, 3), l.decode_k = tensor(2, 3), l.decode_v = tensor(2, 3);
  }
  replay::ReplayOptions o;
  o.methods = MethodSpec::parse_list(
      "snapkv:window=16,snapkv@kvpress:window=16,pyramidkv:window=16,pyramidkv@kvpress:window=16,"
      "adakv:base=snapkv@adakv/window=16,adakv@kvpress:base=snapkv@kvpress/window=16");
  o.budgets = {Budget::tokens(40), Budget::tokens(24), Budget::tokens(80)};
  const auto r = replay::run_replay(meta, [&](int l) { return layers[static_cast<std::size_t>(l)]; }, o);
  ASSERT_EQ(r.runs.size(), 18u);
  for (const auto& run : r.runs) {
    EXPECT_EQ(run.plans_checked, 3 * 2 * 4) << run.label << " " << run.budget;  // (prefill + 3 steps) per head, layer
    if (run.budget_tokens == 80) EXPECT_EQ(run.all.max_rel_l2, 0.0) << run.label;  // the whole prompt kept
    else EXPECT_GT(run.all.max_rel_l2, 0.0) << run.label << " " << run.budget;
  }
}
