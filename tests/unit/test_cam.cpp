// CaM: gate never == StreamingLLM eviction bit for bit; keys untouched; value
// mass handed on exactly (gate always); the Bernoulli gate follows the seeded
// draws; budgets, truncated windows, GQA groups, the kvpress bulk pass, replay.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <map>

#include "decode_driver.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/cam.hpp"
#include "kvscope/reference/methods/streaming_llm.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scores.hpp"
#include "kvscope/replay/replay.hpp"
#include "kvscope/traces/synth.hpp"
#include "kvscope_method_test.hpp"

using namespace kvscope;

namespace {

using tests::make;
using tests::kind_of;

// Key token of every slot (the entry with coef_k != 0).
std::vector<std::int64_t> keys_of(const Plan& p) {
  std::vector<std::int64_t> k;
  for (std::int64_t i = 0; i < p.slots(); ++i)
    for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e)
      if (p.coef_k[static_cast<std::size_t>(e)] != 0.0) k.push_back(p.token[static_cast<std::size_t>(e)]);
  return k;
}

// Total value coefficient of every token over all slots.
std::map<std::int64_t, double> value_mass(const Plan& p) {
  std::map<std::int64_t, double> m;
  for (std::int64_t e = 0; e < p.nnz(); ++e) m[p.token[static_cast<std::size_t>(e)]] += p.coef_v[static_cast<std::size_t>(e)];
  return m;
}

bool same_plan(const Plan& a, const Plan& b) {
  return a.n == b.n && a.row_ptr == b.row_ptr && a.token == b.token && a.coef_k == b.coef_k && a.coef_v == b.coef_v &&
         a.position == b.position && a.positions == b.positions;
}

using Snapshot = std::vector<ref::HeadCache>;

// Prefill caches followed by the caches after every decode step.
std::vector<Snapshot> run(const ref::Method& m, const tests::DecodeLayer& L, std::int64_t budget) {
  std::vector<Snapshot> out;
  const auto lp = m.prefill(L.prefill.input, budget);
  Snapshot first;
  for (std::size_t h = 0; h < lp.plans.size(); ++h) first.push_back(ref::apply_plan(lp.plans[h], L.K[h], L.V[h], 1e4));
  out.push_back(first);
  tests::drive(m, L, budget, [&](const tests::StepView& v) { out.push_back(*v.caches); });
  return out;
}

}  // namespace

RC_GTEST_PROP(CaM, GateNeverIsStreamingEvictionBitForBit, ()) {
  const auto T = *rc::gen::inRange<std::int64_t>(1, 40);
  const auto S = *rc::gen::inRange<std::int64_t>(1, 10);
  const auto kv = *rc::gen::inRange(1, 3);
  const auto g = *rc::gen::inRange(1, 9);
  const auto sinks = *rc::gen::inRange<std::int64_t>(0, 5);
  const auto budget = *rc::gen::inRange<std::int64_t>(sinks + 1, T + S + 3);
  const auto window = *rc::gen::inRange(1, 6);
  const auto prefill = *rc::gen::element<std::string>("simulate", "evict");
  const auto L = tests::random_decode_layer(kv * g, kv, T, S, 4, *rc::gen::arbitrary<std::uint32_t>());
  const std::string s = std::to_string(sinks);
  const auto cam = make("cam:gate=never:sinks=" + s + ":window=" + std::to_string(window) + ":prefill=" + prefill);
  const auto evict = make("streaming_llm@kvpress:decode=evict:sinks=" + s);
  const auto a = run(*cam, L, budget), b = run(*evict, L, budget);
  RC_ASSERT(a.size() == b.size());
  for (std::size_t t = 0; t < a.size(); ++t)
    for (std::size_t h = 0; h < a[t].size(); ++h) {
      RC_ASSERT(same_plan(a[t][h].plan, b[t][h].plan));
      RC_ASSERT(a[t][h].K == b[t][h].K);
      RC_ASSERT(a[t][h].V == b[t][h].V);
    }
}

// Every step: laws (checked by drive), |cache| <= B, keys bitwise the original
// rows, and with gate always the window's value sum grows by the evicted value.
RC_GTEST_PROP(CaM, KeysUntouchedAndValueHandedOn, ()) {
  const auto T = *rc::gen::inRange<std::int64_t>(1, 36);
  const auto S = *rc::gen::inRange<std::int64_t>(1, 10);
  const auto kv = *rc::gen::inRange(1, 3);
  const auto g = *rc::gen::inRange(1, 9);
  const auto sinks = *rc::gen::inRange<std::int64_t>(0, 4);
  const auto budget = *rc::gen::inRange<std::int64_t>(sinks + 1, T + 4);
  const auto window = *rc::gen::inRange<std::int64_t>(1, 7);
  const auto gate = *rc::gen::element<std::string>("bernoulli", "always");
  const auto denom = *rc::gen::element<std::string>("mean", "max");
  const auto attention = *rc::gen::element<std::string>("cumulative", "decode", "step");
  const auto truncated = *rc::gen::element<std::string>("drop", "rescale");
  const auto prefill = *rc::gen::element<std::string>("simulate", "evict", "none");
  const auto L = tests::random_decode_layer(kv * g, kv, T, S, 4, *rc::gen::arbitrary<std::uint32_t>(), 2.0);
  const auto m = make("cam:sinks=" + std::to_string(sinks) + ":window=" + std::to_string(window) + ":gate=" + gate +
                      ":denominator=" + denom + ":attention=" + attention + ":truncated=" + truncated +
                      ":prefill=" + prefill + ":seed=" + std::to_string(*rc::gen::inRange(0, 1000)));
  const auto snaps = run(*m, L, budget);
  for (std::size_t t = 1; t < snaps.size(); ++t)
    for (std::size_t h = 0; h < snaps[t].size(); ++h) {
      const ref::HeadCache& c = snaps[t][h];
      const auto key = keys_of(c.plan);
      RC_ASSERT(c.plan.slots() <= budget);
      for (std::size_t i = 0; i < key.size(); ++i) RC_ASSERT(c.K.row(static_cast<Eigen::Index>(i)) == L.K[h].row(key[i]));
      for (const auto& [j, mass] : value_mass(c.plan)) RC_ASSERT(mass <= 1.0 + 1e-9);
      if (gate != "always" || prefill == "none") continue;  // none: the first pass drops a whole prompt block
      // One token per step: i = the key that left; W = the next m kept keys after it.
      auto before = keys_of(snaps[t - 1][h].plan);
      before.push_back(c.plan.n - 1);
      std::vector<std::int64_t> gone;
      for (std::int64_t j : before)
        if (std::find(key.begin(), key.end(), j) == key.end()) gone.push_back(j);
      RC_ASSERT(gone.size() <= 1u);
      if (gone.empty()) continue;
      const auto prev_row = [&](std::int64_t tok) -> ref::VecX {
        const auto& pk = keys_of(snaps[t - 1][h].plan);
        const auto it = std::find(pk.begin(), pk.end(), tok);
        if (it == pk.end()) return L.V[h].row(tok).transpose();  // the arriving token
        return snaps[t - 1][h].V.row(it - pk.begin()).transpose();
      };
      ref::VecX grew = ref::VecX::Zero(L.V[h].cols());
      std::int64_t w = 0;
      for (std::size_t i = 0; i < key.size() && w < window; ++i)
        if (key[i] > gone[0]) {
          grew += c.V.row(static_cast<Eigen::Index>(i)).transpose() - prev_row(key[i]);
          ++w;
        }
      const double share = truncated == "rescale" ? 1.0 : static_cast<double>(w) / static_cast<double>(window);
      RC_ASSERT((grew - share * prev_row(gone[0])).norm() <= 1e-12 * (1.0 + prev_row(gone[0]).norm()));
    }
}

// The simulated prefill's value rows against the cascade written out as a dense
// matrix, row per slot and column per token: token t arrives (its own row), the
// oldest non-sink slot leaves once the cache holds budget + 1, handing coef times
// its row to each of the next m slots (coef = 1/m, or 1/|W| when rescaled). The
// same additions in the same order, so every coefficient must match exactly,
// and a token is in a slot's row exactly where the matrix is non-zero.
RC_GTEST_PROP(CaM, SimulatedPrefillRowsEqualTheDenseCascade, ()) {
  const auto T = *rc::gen::inRange<std::int64_t>(1, 48);
  const auto sinks = *rc::gen::inRange<std::int64_t>(0, 4);
  const auto budget = *rc::gen::inRange<std::int64_t>(sinks + 1, T + 3);
  const auto window = *rc::gen::inRange<std::int64_t>(1, 7);
  const bool rescale = *rc::gen::arbitrary<bool>();
  const auto L = tests::random_decode_layer(2, 1, T, 0, 4, *rc::gen::arbitrary<std::uint32_t>(), 2.0);
  const auto m = make("cam:sinks=" + std::to_string(sinks) + ":window=" + std::to_string(window) +
                      ":gate=always:prefill=simulate:truncated=" + (rescale ? "rescale" : "drop"));
  const Plan p = m->prefill(L.prefill.input, budget).plans.at(0);

  std::vector<std::int64_t> key;                 // per slot
  std::vector<std::vector<double>> value;        // per slot, per token
  for (std::int64_t t = 0; t < T; ++t) {
    key.push_back(t);
    value.emplace_back(static_cast<std::size_t>(T), 0.0);
    value.back()[static_cast<std::size_t>(t)] = 1.0;
    if (static_cast<std::int64_t>(key.size()) <= budget) continue;
    const auto e = static_cast<std::size_t>(sinks);
    const std::size_t w1 = std::min(key.size(), e + 1 + static_cast<std::size_t>(window));
    const double coef = 1.0 / static_cast<double>(rescale ? static_cast<std::int64_t>(w1 - e - 1) : window);
    for (std::size_t to = e + 1; to < w1; ++to)
      for (std::int64_t j = 0; j < T; ++j)
        if (value[e][static_cast<std::size_t>(j)] != 0.0)
          value[to][static_cast<std::size_t>(j)] = value[to][static_cast<std::size_t>(j)] + coef * value[e][static_cast<std::size_t>(j)];
    key.erase(key.begin() + static_cast<std::ptrdiff_t>(e));
    value.erase(value.begin() + static_cast<std::ptrdiff_t>(e));
  }
  RC_ASSERT(keys_of(p) == key);
  for (std::size_t s = 0; s < key.size(); ++s) {
    std::vector<double> row(static_cast<std::size_t>(T), 0.0);
    for (std::int64_t e = p.row_begin(static_cast<std::int64_t>(s)); e < p.row_end(static_cast<std::int64_t>(s)); ++e) {
      const std::int64_t j = p.token[static_cast<std::size_t>(e)];
      // RC_ASSERT's expression capture would evaluate both sides of an ||.
      const bool increasing = e == p.row_begin(static_cast<std::int64_t>(s)) || j > p.token[static_cast<std::size_t>(e) - 1];
      RC_ASSERT(increasing);
      RC_ASSERT(p.coef_k[static_cast<std::size_t>(e)] == (j == key[s] ? 1.0 : 0.0));
      RC_ASSERT(p.coef_v[static_cast<std::size_t>(e)] != 0.0);
      row[static_cast<std::size_t>(j)] = p.coef_v[static_cast<std::size_t>(e)];
    }
    RC_ASSERT(row == value[s]);
  }
}

TEST(CaM, ByHandCascadeHandsMassOnExactly) {
  // T = 10, B = 6, sinks 2, m = 3: the prompt keeps 0 1 6 7 8 9.
  const auto L = tests::random_decode_layer(1, 1, 10, 2, 4, 3);
  const auto m = make("cam:sinks=2:window=3:gate=always:prefill=evict");
  const auto snaps = run(*m, L, 6);
  ASSERT_EQ(snaps.size(), 3u);
  EXPECT_EQ(keys_of(snaps[0][0].plan), (std::vector<std::int64_t>{0, 1, 6, 7, 8, 9}));
  // Step 0: token 10 arrives, token 6 leaves, a third of V_6 goes to each of 7 8 9.
  const Plan& p1 = snaps[1][0].plan;
  EXPECT_EQ(keys_of(p1), (std::vector<std::int64_t>{0, 1, 7, 8, 9, 10}));
  EXPECT_EQ(p1.token, (std::vector<std::int64_t>{0, 1, 6, 7, 6, 8, 6, 9, 10}));
  for (std::int64_t slot = 2; slot <= 4; ++slot) EXPECT_EQ(p1.coef_v[static_cast<std::size_t>(p1.row_begin(slot))], 1.0 / 3);
  EXPECT_EQ(p1.position, (std::vector<std::int64_t>{0, 1, 7, 8, 9, 10}));  // original positions
  // Step 1: token 7 leaves with its third of V_6; tokens 6 and 7 are still handed on in full.
  const auto mass = value_mass(snaps[2][0].plan);
  EXPECT_NEAR(mass.at(6), 1.0, 1e-15);
  EXPECT_NEAR(mass.at(7), 1.0, 1e-15);
  EXPECT_EQ(keys_of(snaps[2][0].plan), (std::vector<std::int64_t>{0, 1, 8, 9, 10, 11}));
  // Sinks never receive anything.
  EXPECT_EQ(snaps[2][0].plan.row_end(1), 2);
}

TEST(CaM, TruncatedWindowDropsOrRescales) {
  // B = sinks + 2: at most 2 kept slots follow the evicted one, m = 8.
  const auto L = tests::random_decode_layer(2, 1, 12, 1, 4, 4);
  for (const char* mode : {"drop", "rescale"}) {
    const auto m = make(std::string("cam:sinks=1:window=8:gate=always:prefill=evict:truncated=") + mode);
    const auto snaps = run(*m, L, 3);
    const Plan& p = snaps.back()[0].plan;  // keys 0 11 12; token 10 handed to 11 and 12
    EXPECT_EQ(keys_of(p), (std::vector<std::int64_t>{0, 11, 12}));
    const double want = std::string(mode) == "drop" ? 1.0 / 8 : 1.0 / 2;
    EXPECT_EQ(value_mass(p).at(10), 2 * want) << mode;
  }
}

TEST(CaM, BernoulliGateFollowsTheSeededDraws) {
  // Prompt 30, B 10, sinks 2, m 4, one-shot prefill: step 0 evicts token 22 with
  // p = Ā_22 / mean(Ā_23..26), Ā the group mean of the last prompt query's
  // attention (attention=step; the cumulative score gives older tokens p = 1 here).
  const auto L = tests::random_decode_layer(4, 2, 30, 1, 8, 9, 3.0);
  int merged = 0, expected = 0, n = 0;
  for (int h = 0; h < 2; ++h) {
    std::vector<double> abar(30, 0.0);
    for (int q = 2 * h; q < 2 * h + 2; ++q) {
      const auto& in = L.prefill.input;
      const ref::VecX qt = in.q[static_cast<std::size_t>(q)].row(29).transpose();
      const ref::VecX a = ref::attend(qt, in.k[static_cast<std::size_t>(h)], in.v[static_cast<std::size_t>(h)]).probs;
      for (int j = 0; j < 30; ++j) abar[static_cast<std::size_t>(j)] += a[j] / 2;
    }
    const double p = std::min(1.0, abar[22] / ((abar[23] + abar[24] + abar[25] + abar[26]) / 4));
    for (int seed = 0; seed < 120; ++seed, ++n) {
      const auto m = make("cam:sinks=2:window=4:prefill=evict:attention=step:seed=" + std::to_string(seed));
      const auto snaps = run(*m, L, 10);
      const Plan& plan = snaps.back()[static_cast<std::size_t>(h)].plan;
      const bool did = value_mass(plan).count(22) > 0;
      const bool want = ref::cam_uniform(static_cast<std::uint64_t>(seed), 0, h, 22) < p;
      EXPECT_EQ(did, want) << "seed " << seed << " head " << h << " p " << p;
      merged += did;
      expected += want;
    }
  }
  EXPECT_EQ(merged, expected);
  EXPECT_GT(merged, 0);  // the draws are not degenerate on this layer
  EXPECT_LT(merged, n);
}

TEST(CaM, DrawsAreReproducibleAndSeedDependent) {
  const auto L = tests::random_decode_layer(4, 2, 48, 16, 8, 5, 2.0);
  auto final_plans = [&](const std::string& spec) {
    std::vector<Plan> out;
    const auto snaps = run(*make(spec), L, 16);
    for (const auto& c : snaps.back()) out.push_back(c.plan);
    return out;
  };
  const auto a = final_plans("cam:window=4:seed=1"), b = final_plans("cam:window=4:seed=1"),
             c = final_plans("cam:window=4:seed=2");
  bool differ = false;
  for (std::size_t h = 0; h < a.size(); ++h) {
    EXPECT_TRUE(same_plan(a[h], b[h]));
    differ = differ || !same_plan(a[h], c[h]);
  }
  EXPECT_TRUE(differ);
  // The stream itself: deterministic, in [0, 1), keyed by every coordinate, roughly uniform.
  EXPECT_EQ(ref::cam_uniform(7, 1, 2, 3), ref::cam_uniform(7, 1, 2, 3));
  EXPECT_NE(ref::cam_uniform(7, 1, 2, 3), ref::cam_uniform(8, 1, 2, 3));
  EXPECT_NE(ref::cam_uniform(7, 1, 2, 3), ref::cam_uniform(7, 0, 2, 3));
  EXPECT_NE(ref::cam_uniform(7, 1, 2, 3), ref::cam_uniform(7, 1, 1, 3));
  EXPECT_NE(ref::cam_uniform(7, 1, 2, 3), ref::cam_uniform(7, 1, 2, 4));
  double sum = 0;
  for (int t = 0; t < 20000; ++t) {
    const double u = ref::cam_uniform(0, 0, 0, t);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
  }
  EXPECT_NEAR(sum / 20000, 0.5, 0.01);
}

TEST(CaM, BudgetEdges) {
  const auto L = tests::random_decode_layer(2, 1, 20, 4, 4, 6);
  EXPECT_EQ(kind_of([&] { make("cam:sinks=0")->prefill(L.prefill.input, 0); }), ErrorKind::kImpossibleBudget);
  EXPECT_EQ(kind_of([&] { make("cam")->prefill(L.prefill.input, 4); }), ErrorKind::kImpossibleBudget);
  EXPECT_EQ(kind_of([&] { make("cam")->protected_tokens(20, 3); }), ErrorKind::kImpossibleBudget);
  // Budget 1: only the arriving token stays; what it replaces is handed to it.
  const auto one = run(*make("cam:sinks=0:gate=always:truncated=rescale"), L, 1);
  for (const auto& s : one) EXPECT_EQ(s[0].plan.slots(), 1);
  EXPECT_EQ(keys_of(one.back()[0].plan), (std::vector<std::int64_t>{23}));
  EXPECT_NEAR(value_mass(one.back()[0].plan).at(22), 1.0, 1e-15);
  // A budget covering prompt and decode never evicts: the identity, no merges.
  for (const auto& s : run(*make("cam:gate=always"), L, 24))
    EXPECT_EQ(s[0].plan.token, Plan::identity(s[0].plan.n).token);
  EXPECT_EQ(make("cam")->protected_tokens(20, 10), (std::vector<std::int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(make("cam")->protected_tokens(2, 10), (std::vector<std::int64_t>{0, 1}));
}

TEST(CaM, KvpressBulkPassEveryInterval) {
  // Prompt kept whole; every 4th step one pass evicts down to B = 12 and only
  // the 4 newest evicted tokens may hand on their value (window: 8 kept, rescaled).
  const auto L = tests::random_decode_layer(2, 1, 20, 8, 4, 8);
  const auto m = make("cam@kvpress:interval=4:gate=always");
  EXPECT_EQ(m->laws().prefill_budget, ref::BudgetLaw::kNone);
  EXPECT_EQ(m->laws().decode_budget, ref::BudgetLaw::kNone);
  const auto snaps = run(*m, L, 12);
  std::vector<std::int64_t> sizes;
  for (const auto& s : snaps) sizes.push_back(s[0].plan.slots());
  EXPECT_EQ(sizes, (std::vector<std::int64_t>{20, 21, 22, 23, 12, 13, 14, 15, 12}));
  const auto mass = value_mass(snaps[4][0].plan);  // step 3: tokens 4..15 evicted, 12..15 merged
  for (std::int64_t j = 4; j < 12; ++j) EXPECT_EQ(mass.count(j), 0u) << j;
  for (std::int64_t j = 12; j < 16; ++j) EXPECT_NEAR(mass.at(j), 1.0, 1e-15) << j;
  EXPECT_EQ(keys_of(snaps[4][0].plan), (std::vector<std::int64_t>{0, 1, 2, 3, 16, 17, 18, 19, 20, 21, 22, 23}));
}

TEST(CaM, PresetsAndBadConfiguration) {
  EXPECT_EQ(make("cam")->laws().conservation, ref::ConservationLaw::kValueHandOff);
  EXPECT_EQ(make("cam")->laws().decode_budget, ref::BudgetLaw::kAtMost);
  EXPECT_NE(make("cam")->name().find("cam@paper"), std::string::npos);
  EXPECT_NE(make("cam@lm-eval")->name().find("denominator=max"), std::string::npos);
  for (const char* bad : {"cam@nope", "cam:gate=maybe", "cam:window=0", "cam:denominator=median", "cam:seed=-1",
                          "cam:attention=x", "cam:prefill=sometimes", "cam:interval=0", "cam:truncated=x"})
    EXPECT_EQ(kind_of([&] { make(bad); }), ErrorKind::kUsage) << bad;
}

TEST(CaM, ReplayChecksEveryPlanAndNeverMatchesEviction) {
  traces::SynthConfig c;
  c.layers = 2;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.head_dim = 16;
  c.prompt = 64;
  c.decode = 10;
  replay::ReplayOptions o;
  o.methods = MethodSpec::parse_list(
      "cam:gate=never,streaming_llm@kvpress:decode=evict,cam,cam:gate=always,cam@lm-eval,cam@kvpress:interval=3");
  for (const char* b : {"50%", "12"}) o.budgets.push_back(Budget::parse(b));
  const auto r = replay::run_replay(traces::synth_meta(c), [&](int l) { return traces::synth_layer(c, l); }, o);
  ASSERT_EQ(r.runs.size(), 12u);
  for (const auto& run : r.runs) EXPECT_EQ(run.plans_checked, c.layers * c.kv_heads * (1 + c.decode)) << run.label;
  for (std::size_t b = 0; b < 2; ++b) {
    const auto& never = r.runs[b].all;
    const auto& evict = r.runs[2 + b].all;
    EXPECT_EQ(never.sum_rel_l2, evict.sum_rel_l2);
    EXPECT_EQ(never.sum_cosine, evict.sum_cosine);
    EXPECT_EQ(never.sum_mass_lost, evict.sum_mass_lost);
    EXPECT_NE(r.runs[4 + b].all.sum_rel_l2, evict.sum_rel_l2);  // the gate did merge something
    // Same keys as plain eviction: a value share does not bring a token's attention back.
    EXPECT_EQ(r.runs[4 + b].all.sum_mass_lost, evict.sum_mass_lost);
    EXPECT_EQ(r.runs[6 + b].all.sum_mass_lost, evict.sum_mass_lost);
    EXPECT_NE(r.runs[6 + b].all.sum_rel_l2, r.runs[4 + b].all.sum_rel_l2);
  }
}
