// WeightedKV (docs/algorithms/weightedkv.md): keys are never modified (every
// slot holds one original key with coefficient 1, bit-exact); value rows are
// convex over contiguous segments that partition the tokens seen; |cache| =
// min(B, n) after prefill and every decode step; the recent band is never
// dropped and sinks stay bit-exact; each merge matches an independent replay
// of the rule (victim = lowest average, oldest on ties; neighbour; lambda);
// huge B is full attention exactly; constant averages give plain averages;
// streaming prefill equals decoding the prompt token by token; determinism;
// GQA group sizes 1..8; errors.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>

#include "decode_driver.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/weightedkv.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope_method_test.hpp"

using namespace kvscope;

namespace {

using tests::make;
using tests::kind_of;

std::int64_t key_of(const Plan& p, std::int64_t i) {
  std::int64_t key = -1, keys = 0;
  for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e)
    if (p.coef_k[static_cast<std::size_t>(e)] != 0.0) {
      ++keys;
      key = p.token[static_cast<std::size_t>(e)];
      RC_ASSERT(p.coef_k[static_cast<std::size_t>(e)] == 1.0);
    }
  RC_ASSERT(keys == 1);
  return key;
}

std::map<std::int64_t, double> value_row(const Plan& p, std::int64_t i) {
  std::map<std::int64_t, double> r;
  for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e)
    r[p.token[static_cast<std::size_t>(e)]] = p.coef_v[static_cast<std::size_t>(e)];
  return r;
}

// The shared cache invariants of one kv head holding n tokens.
void check_cache(const ref::HeadCache& c, const ref::MatX& K, std::int64_t n, std::int64_t budget,
                 std::int64_t sinks, std::int64_t recent) {
  const Plan& p = c.plan;
  RC_ASSERT(p.n == n);
  RC_ASSERT(p.slots() == std::min(budget, n));
  std::int64_t next = 0, prev_key = -1;
  std::vector<char> key_present(static_cast<std::size_t>(n), 0);
  for (std::int64_t i = 0; i < p.slots(); ++i) {
    const std::int64_t key = key_of(p, i);
    RC_ASSERT(key > prev_key);  // slots in position order, keys distinct
    prev_key = key;
    key_present[static_cast<std::size_t>(key)] = 1;
    RC_ASSERT(p.position[static_cast<std::size_t>(i)] == key);
    RC_ASSERT(c.K.row(i) == K.row(key));  // keys never modified, bit-exact
    // Value row: a contiguous segment continuing the partition, convex, holding the key.
    double sum = 0;
    bool has_key = false;
    for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e) {
      const auto eu = static_cast<std::size_t>(e);
      RC_ASSERT(p.token[eu] == next);
      ++next;
      RC_ASSERT(p.coef_v[eu] >= 0.0);
      sum += p.coef_v[eu];
      has_key = has_key || p.token[eu] == key;
    }
    RC_ASSERT(has_key);
    RC_ASSERT(std::abs(sum - 1.0) < 1e-12);
    RC_ASSERT(p.count[static_cast<std::size_t>(i)] == p.row_end(i) - p.row_begin(i));
  }
  RC_ASSERT(next == n);  // the segments partition [0, n)
  for (std::int64_t j = std::max<std::int64_t>(0, n - recent); j < n; ++j) RC_ASSERT(key_present[static_cast<std::size_t>(j)] != 0);
  for (std::int64_t j = 0; j < std::min(sinks, n); ++j) {
    RC_ASSERT(p.row_end(j) - p.row_begin(j) == 1);
    RC_ASSERT(p.token[static_cast<std::size_t>(p.row_begin(j))] == j);
    RC_ASSERT(p.coef_v[static_cast<std::size_t>(p.row_begin(j))] == 1.0);
  }
}

struct Setup {
  int kv, g, d;
  std::int64_t T, S, sinks, recent, budget;
  double scale;
  std::string neighbour, update, prefill, gqa;
  std::uint64_t seed;
  std::string spec() const {
    return "weightedkv:sinks=" + std::to_string(sinks) + ":recent=" + std::to_string(recent) + ":neighbour=" +
           neighbour + ":score_update=" + update + ":prefill=" + prefill + ":gqa=" + gqa;
  }
};

rc::Gen<Setup> setups() {
  return rc::gen::exec([] {
    Setup s;
    s.kv = *rc::gen::inRange(1, 3);
    s.g = *rc::gen::inRange(1, 9);
    s.d = *rc::gen::inRange(1, 5);
    s.T = *rc::gen::inRange<std::int64_t>(1, 20);
    s.S = *rc::gen::inRange<std::int64_t>(1, 9);
    s.sinks = *rc::gen::inRange<std::int64_t>(0, 4);
    s.recent = *rc::gen::inRange<std::int64_t>(0, 4);
    const std::int64_t lo = s.sinks + std::max<std::int64_t>(s.recent, 1);
    s.budget = *rc::gen::inRange<std::int64_t>(lo, std::max(lo, s.T + s.S) + 2);
    s.scale = *rc::gen::element(0.0, 1.0, 3.0);  // 0: uniform attention, every average ties
    s.neighbour = *rc::gen::element<std::string>("next", "previous");
    s.update = *rc::gen::element<std::string>("keep", "add");
    s.prefill = *rc::gen::element<std::string>("streaming", "oneshot");
    s.gqa = *rc::gen::element<std::string>("mean", "max", "sum");
    s.seed = *rc::gen::inRange<std::uint64_t>(0, 100000);
    return s;
  });
}

double reduce(const std::vector<double>& v, const std::string& rule) {
  double s = 0, m = v.front();
  for (double x : v) s += x, m = std::max(m, x);
  return rule == "max" ? m : rule == "sum" ? s : s / static_cast<double>(v.size());
}

}  // namespace

RC_GTEST_PROP(WeightedKV, KeysKeptValuesConvexSegmentsAndBudgetEveryStep, ()) {
  const Setup s = *setups();
  const auto L = tests::random_decode_layer(s.kv * s.g, s.kv, s.T, s.S, s.d, s.seed, s.scale);
  const auto m = make(s.spec());
  const auto laws = m->laws();
  RC_ASSERT(laws.prefill_budget == ref::BudgetLaw::kExact);
  RC_ASSERT(laws.decode_budget == ref::BudgetLaw::kExact);
  RC_ASSERT(laws.conservation == ref::ConservationLaw::kRowConvex);
  const ref::LayerPlans pre = m->prefill(L.prefill.input, s.budget);
  for (int h = 0; h < s.kv; ++h)
    check_cache(ref::apply_plan(pre.plans[static_cast<std::size_t>(h)], L.K[static_cast<std::size_t>(h)],
                                L.V[static_cast<std::size_t>(h)], 10000.0),
                L.K[static_cast<std::size_t>(h)], s.T, s.budget, s.sinks, s.recent);
  bool merged = false;
  const auto caches = tests::drive(*m, L, s.budget, [&](const tests::StepView& v) {
    const std::int64_t n = s.T + v.step + 1;
    for (int h = 0; h < s.kv; ++h)
      check_cache((*v.caches)[static_cast<std::size_t>(h)], L.K[static_cast<std::size_t>(h)], n, s.budget, s.sinks,
                  s.recent);
    merged = merged || n > s.budget;
  });
  RC_TAG(merged ? "merging" : "budget covers");
  // Determinism: bit-identical plans on a second run.
  const auto again = tests::drive(*m, L, s.budget);
  for (int h = 0; h < s.kv; ++h) {
    const Plan &a = caches[static_cast<std::size_t>(h)].plan, &b = again[static_cast<std::size_t>(h)].plan;
    RC_ASSERT(a.token == b.token);
    RC_ASSERT(a.coef_k == b.coef_k);
    RC_ASSERT(a.coef_v == b.coef_v);
  }
}

// Every decode merge against an independent replay of the rule: state from the
// oneshot prefill (recorded integer accumulated attention, no prefill merge),
// the step's probabilities, victim = lowest S/n outside sinks and the recent
// band (oldest on ties), neighbour, lambda = a_e / (a_e + a_m) (1/2 when 0).
RC_GTEST_PROP(WeightedKV, DecodeMergesFollowTheRule, ()) {
  Setup s = *setups();
  s.prefill = "oneshot";
  s.budget = std::max(s.T, s.sinks + std::max<std::int64_t>(s.recent, 1));
  auto L = tests::random_decode_layer(s.kv * s.g, s.kv, s.T, s.S, s.d, s.seed, s.scale);
  for (int h = 0; h < s.kv * s.g; ++h) {
    ref::VecX a(s.T);
    for (std::int64_t j = 0; j < s.T; ++j) a[j] = *rc::gen::inRange(0, 3);
    L.prefill.input.attn_colsum.push_back(a);
  }
  const auto m = make(s.spec());
  // Independent state per kv head, keyed by original token.
  std::vector<std::map<std::int64_t, double>> S(static_cast<std::size_t>(s.kv)), N(S.size());
  std::vector<Plan> prev;
  for (int h = 0; h < s.kv; ++h) {
    for (std::int64_t j = 0; j < s.T; ++j) {
      std::vector<double> v;
      for (int q = 0; q < s.g; ++q) v.push_back(L.prefill.input.attn_colsum[static_cast<std::size_t>(h * s.g + q)][j]);
      S[static_cast<std::size_t>(h)][j] = reduce(v, s.gqa);
      N[static_cast<std::size_t>(h)][j] = static_cast<double>(s.T - j);
    }
    prev.push_back(Plan::identity(s.T));  // budget >= T: prefill keeps everything
  }
  int merges = 0;
  tests::drive(*m, L, s.budget, [&](const tests::StepView& v) {
    const std::int64_t n = s.T + v.step + 1;
    for (int h = 0; h < s.kv; ++h) {
      const auto hu = static_cast<std::size_t>(h);
      Plan before = prev[hu];
      append_token(before);
      const std::int64_t size = before.slots();
      std::vector<std::int64_t> keys;
      for (std::int64_t i = 0; i < size; ++i) keys.push_back(key_of(before, i));
      for (std::int64_t i = 0; i < size; ++i) {
        std::vector<double> p;
        for (int q = 0; q < s.g; ++q) p.push_back((*v.probs)[hu * static_cast<std::size_t>(s.g) + static_cast<std::size_t>(q)][i]);
        S[hu][keys[static_cast<std::size_t>(i)]] += reduce(p, s.gqa);
        N[hu][keys[static_cast<std::size_t>(i)]] += 1;
      }
      const Plan& after = (*v.caches)[hu].plan;
      if (size <= s.budget) {
        RC_ASSERT(after.slots() == size);
        prev[hu] = after;
        continue;
      }
      auto avg = [&](std::int64_t i) { return S[hu][keys[static_cast<std::size_t>(i)]] / N[hu][keys[static_cast<std::size_t>(i)]]; };
      std::int64_t e = -1;
      for (std::int64_t i = 0; i < size - s.recent; ++i)
        if (keys[static_cast<std::size_t>(i)] >= s.sinks && (e < 0 || avg(i) < avg(e))) e = i;
      RC_ASSERT(e >= 0);
      auto ok = [&](std::int64_t i) { return i >= 0 && i < size && keys[static_cast<std::size_t>(i)] >= s.sinks; };
      std::int64_t into = s.neighbour == "next" ? e + 1 : e - 1;
      if (!ok(into)) into = s.neighbour == "next" ? e - 1 : e + 1;
      const double ae = avg(e), am = avg(into);
      const double lambda = ae + am > 0 ? ae / (ae + am) : 0.5;
      // The new cache: the victim's key gone, the neighbour's value row mixed.
      RC_ASSERT(after.slots() == size - 1);
      std::int64_t out = 0;
      for (std::int64_t i = 0; i < size; ++i) {
        if (i == e) continue;
        RC_ASSERT(key_of(after, out) == keys[static_cast<std::size_t>(i)]);
        std::map<std::int64_t, double> want = value_row(before, i);
        if (i == into) {
          for (auto& [t, w] : want) w *= 1 - lambda;
          for (const auto& [t, w] : value_row(before, e)) want[t] += lambda * w;
        }
        const auto got = value_row(after, out);
        RC_ASSERT(got.size() == want.size());
        for (const auto& [t, w] : want) {
          RC_ASSERT(got.count(t) == 1);
          RC_ASSERT(std::abs(got.at(t) - w) < 1e-12);
        }
        ++out;
      }
      if (s.update == "add") S[hu][keys[static_cast<std::size_t>(into)]] += S[hu][keys[static_cast<std::size_t>(e)]];
      ++merges;
      prev[hu] = after;
    }
    (void)n;
  });
  RC_TAG(merges > 0 ? "merged" : "no merge");
}

TEST(WeightedKV, HugeBudgetIsFullAttentionExactly) {
  const auto L = tests::random_decode_layer(8, 2, 12, 6, 4, 3);
  for (const char* spec : {"weightedkv", "weightedkv@sinks", "weightedkv@oneshot", "weightedkv@mass"}) {
    const auto m = make(spec);
    const auto caches = tests::drive(*m, L, 18, [&](const tests::StepView& v) {
      for (std::size_t h = 0; h < 2; ++h) {
        const auto& c = (*v.caches)[h];
        const std::int64_t n = 12 + v.step + 1;
        ASSERT_EQ(c.plan.slots(), n);
        EXPECT_TRUE(c.K == L.K[h].topRows(n));
        EXPECT_TRUE(c.V == L.V[h].topRows(n));
      }
    });
    EXPECT_EQ(caches[0].plan.slots(), 18) << spec;
  }
}

TEST(WeightedKV, ConstantAveragesGivePlainAverages) {
  // Oneshot with accumulated attention 2 (T - j): every average is 2, so the
  // victim is always the oldest candidate and every merge weight is 1/2.
  const std::int64_t T = 10;
  auto f = tests::random_layer(2, 1, T, 4, 9);
  ref::VecX a(T);
  for (std::int64_t j = 0; j < T; ++j) a[j] = 2.0 * static_cast<double>(T - j);
  f.input.attn_colsum = {a, a};
  const auto m = make("weightedkv@oneshot");
  for (std::int64_t k = 1; k <= 5; ++k) {
    const Plan p = m->prefill(f.input, T - k).plans[0];
    ASSERT_EQ(p.slots(), T - k);
    // Slot 0 (key k) took tokens 0..k: token 0 weighs 2^-k, token j >= 1 weighs 2^-(k - j + 1).
    const auto row = [&] {
      std::map<std::int64_t, double> r;
      for (std::int64_t e = p.row_begin(0); e < p.row_end(0); ++e) r[p.token[static_cast<std::size_t>(e)]] = p.coef_v[static_cast<std::size_t>(e)];
      return r;
    }();
    ASSERT_EQ(static_cast<std::int64_t>(row.size()), k + 1);
    EXPECT_EQ(row.at(0), std::ldexp(1.0, static_cast<int>(-k)));
    for (std::int64_t j = 1; j <= k; ++j) EXPECT_EQ(row.at(j), std::ldexp(1.0, static_cast<int>(j - k - 1))) << j;
    for (std::int64_t i = 1; i < p.slots(); ++i) EXPECT_EQ(p.row_end(i) - p.row_begin(i), 1);
  }
}

TEST(WeightedKV, ZeroAttentionMergesHalfAndHalf) {
  std::vector<ref::WeightedSlot> slots(3);
  for (std::int64_t i = 0; i < 3; ++i) {
    slots[static_cast<std::size_t>(i)].key = slots[static_cast<std::size_t>(i)].token = slots[static_cast<std::size_t>(i)].position = i;
    slots[static_cast<std::size_t>(i)].value = {{i, 1.0}};
    slots[static_cast<std::size_t>(i)].n = 1;
  }
  ref::WeightedKVConfig c;
  std::vector<ref::WeightedMerge> log;
  ref::weightedkv_compress(slots, 2, c, &log);
  ASSERT_EQ(log.size(), 1u);
  EXPECT_EQ(log[0].victim_token, 0);
  EXPECT_EQ(log[0].into_token, 1);
  EXPECT_EQ(log[0].lambda, 0.5);
  EXPECT_EQ(slots[0].value, (std::vector<std::pair<std::int64_t, double>>{{0, 0.5}, {1, 0.5}}));
}

TEST(WeightedKV, StreamingPrefillEqualsDecodingThePromptTokenByToken) {
  // Prompt of T tokens streamed at prefill == a 1-token prompt then T - 1
  // decode steps over the same rows (keys are original, so the attention matches).
  const std::int64_t T = 14, B = 6;
  const auto full = tests::random_decode_layer(4, 2, T, 1, 4, 21);
  for (const char* spec : {"weightedkv", "weightedkv@sinks:sinks=1:recent=2", "weightedkv:neighbour=previous:score_update=add"}) {
    const auto m = make(spec);
    const ref::LayerPlans pre = m->prefill(full.prefill.input, B);
    auto L = tests::random_decode_layer(4, 2, 1, T - 1, 4, 21);
    for (int h = 0; h < 2; ++h) {
      L.K[static_cast<std::size_t>(h)] = full.K[static_cast<std::size_t>(h)].topRows(T);
      L.V[static_cast<std::size_t>(h)] = full.V[static_cast<std::size_t>(h)].topRows(T);
      L.prefill.input.k[static_cast<std::size_t>(h)] = L.K[static_cast<std::size_t>(h)].topRows(1);
      L.prefill.input.v[static_cast<std::size_t>(h)] = L.V[static_cast<std::size_t>(h)].topRows(1);
    }
    for (int h = 0; h < 4; ++h) {
      L.prefill.input.q[static_cast<std::size_t>(h)] = full.prefill.input.q[static_cast<std::size_t>(h)].topRows(1);
      L.decode_q[static_cast<std::size_t>(h)] = full.prefill.input.q[static_cast<std::size_t>(h)].middleRows(1, T - 1);
    }
    const auto caches = tests::drive(*m, L, B);
    for (int h = 0; h < 2; ++h) {
      const Plan &a = pre.plans[static_cast<std::size_t>(h)], &b = caches[static_cast<std::size_t>(h)].plan;
      ASSERT_EQ(a.token, b.token) << spec;
      ASSERT_EQ(a.coef_k, b.coef_k) << spec;
      for (std::size_t e = 0; e < a.coef_v.size(); ++e) EXPECT_NEAR(a.coef_v[e], b.coef_v[e], 1e-12) << spec;
    }
  }
}

TEST(WeightedKV, RecentBandIsNeverDroppedAndSinksNeverChange) {
  const auto L = tests::random_decode_layer(2, 1, 20, 10, 4, 5, 3.0);
  const auto m = make("weightedkv@sinks");  // 4 sinks, 8 recent
  EXPECT_EQ(m->protected_tokens(30, 12), (std::vector<std::int64_t>{0, 1, 2, 3}));
  tests::drive(*m, L, 12, [&](const tests::StepView& v) {
    const Plan& p = (*v.caches)[0].plan;
    ASSERT_EQ(p.slots(), 12);
    for (std::int64_t i = 0; i < 4; ++i) EXPECT_EQ(p.row_end(i) - p.row_begin(i), 1);
    // The last 8 slots hold the 8 newest keys.
    for (std::int64_t i = 0; i < 8; ++i) {
      std::int64_t key = -1;
      for (std::int64_t e = p.row_begin(4 + i); e < p.row_end(4 + i); ++e)
        if (p.coef_k[static_cast<std::size_t>(e)] == 1.0) key = p.token[static_cast<std::size_t>(e)];
      EXPECT_EQ(key, p.n - 8 + i);
    }
  });
}

TEST(WeightedKV, ImpossibleBudgetsAndBadParameters) {
  auto f = tests::random_layer(2, 1, 10, 4, 8);
  EXPECT_EQ(kind_of([&] { make("weightedkv")->prefill(f.input, 0); }), ErrorKind::kImpossibleBudget);
  EXPECT_EQ(make("weightedkv")->prefill(f.input, 1).plans[0].slots(), 1);
  EXPECT_EQ(kind_of([&] { make("weightedkv@sinks")->prefill(f.input, 11); }), ErrorKind::kImpossibleBudget);
  EXPECT_EQ(make("weightedkv@sinks")->prefill(f.input, 12).plans[0].slots(), 10);
  EXPECT_EQ(kind_of([&] { make("weightedkv:sinks=2:recent=0")->protected_tokens(10, 2); }), ErrorKind::kImpossibleBudget);
  for (const char* bad : {"weightedkv:neighbour=left", "weightedkv:sinks=-1", "weightedkv:recent=x",
                          "weightedkv:score_update=max", "weightedkv:prefill=chunked", "weightedkv:gqa=min"})
    EXPECT_EQ(kind_of([&] { make(bad); }), ErrorKind::kUsage) << bad;
}
