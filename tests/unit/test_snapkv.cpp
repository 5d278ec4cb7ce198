// SnapKV: window kept, per-head count exact, kept-set optimality with ties
// reported, scores equal to a loop-by-loop transcription of the paper's
// eq. 1 + pooling, the GQA orders agree exactly where pooling is linear, and
// the budget edge cases (n <= budget, n <= window, budgets 0 and 1).
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <cmath>

#include "kvscope/reference/methods/snapkv.hpp"
#include "kvscope/reference/plan_checker.hpp"
#include "snapkv_test_support.hpp"

using namespace kvscope;
using namespace kvscope::tests::snap;

namespace {

struct Naive {
  std::int64_t w, kernel;
  std::string pool, rows, gqa, group;
};

// Transcription of snapkv_utils.py / SnapKVPress.score with plain loops.
std::vector<std::vector<double>> naive_scores(const ref::LayerInput& in, const Naive& c) {
  const auto T = in.tokens();
  const std::int64_t w = std::min(c.w, T), m = T - w;
  const int hq = static_cast<int>(in.q.size()), hkv = static_cast<int>(in.k.size()), G = hq / hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(in.k[0].cols()));
  auto pool = [&](const std::vector<double>& x) {
    if (c.pool == "none") return x;
    std::vector<double> y(x.size());
    const auto half = c.kernel / 2, n = static_cast<std::int64_t>(x.size());
    for (std::int64_t i = 0; i < n; ++i) {
      double acc = c.pool == "avg" ? 0.0 : -INFINITY;
      for (std::int64_t j = i - half; j <= i + half; ++j) {
        if (j < 0 || j >= n) continue;  // zero padding (avg counts it in the divisor), -inf (max)
        acc = c.pool == "avg" ? acc + x[static_cast<std::size_t>(j)] : std::max(acc, x[static_cast<std::size_t>(j)]);
      }
      y[static_cast<std::size_t>(i)] = c.pool == "avg" ? acc / static_cast<double>(c.kernel) : acc;
    }
    return y;
  };
  std::vector<std::vector<double>> per_q;
  for (int h = 0; h < hq; ++h) {
    const ref::MatX& Q = in.q[static_cast<std::size_t>(h)];
    const ref::MatX& K = in.k[static_cast<std::size_t>(h / G)];
    std::vector<double> s(static_cast<std::size_t>(m), 0.0);
    for (std::int64_t t = T - w; t < T; ++t) {
      std::vector<double> z;
      double mx = -INFINITY, den = 0;
      for (std::int64_t j = 0; j <= t; ++j) {
        z.push_back(Q.row(t).dot(K.row(j)) * scale);
        mx = std::max(mx, z.back());
      }
      for (double& v : z) den += (v = std::exp(v - mx));
      for (std::int64_t j = 0; j < m; ++j) s[static_cast<std::size_t>(j)] += z[static_cast<std::size_t>(j)] / den;
    }
    if (c.rows == "mean")
      for (double& v : s) v /= static_cast<double>(w);
    per_q.push_back(c.gqa == "pool-then-group" ? pool(s) : s);
  }
  std::vector<std::vector<double>> out;
  for (int g = 0; g < hkv; ++g) {
    std::vector<double> r(static_cast<std::size_t>(m), c.group == "max" ? -INFINITY : 0.0);
    for (int i = 0; i < G; ++i)
      for (std::size_t j = 0; j < r.size(); ++j) {
        const double v = per_q[static_cast<std::size_t>(g * G + i)][j];
        r[j] = c.group == "max" ? std::max(r[j], v) : r[j] + v;
      }
    if (c.group == "mean")
      for (double& v : r) v /= G;
    out.push_back(c.gqa == "group-then-pool" ? pool(r) : r);
  }
  return out;
}

std::string spec_of(const Naive& c) {
  return "snapkv:window=" + std::to_string(c.w) + ":kernel=" + std::to_string(c.kernel) + ":pooling=" + c.pool +
         ":rows=" + c.rows + ":gqa=" + c.gqa + ":group_reduce=" + c.group;
}

double max_rel_diff(const ref::VecX& a, const std::vector<double>& b) {
  double d = 0;
  for (std::size_t j = 0; j < b.size(); ++j)
    d = std::max(d, std::abs(a[static_cast<Eigen::Index>(j)] - b[j]) / std::max(1e-300, std::abs(b[j])));
  return d;
}

}  // namespace

RC_GTEST_PROP(SnapKV, WindowKeptCountExactAndKeptSetOptimal, ()) {
  const int kv = *rc::gen::inRange(1, 4), G = *rc::gen::inRange(1, 9);  // GQA group sizes 1..8
  const auto T = *rc::gen::inRange<std::int64_t>(1, 60);
  const auto f = gen_layer(kv * G, kv, T, 2 * *rc::gen::inRange(1, 4), *rc::gen::arbitrary<bool>());
  const auto w = *rc::gen::inRange<std::int64_t>(0, 16);
  const std::string spec = *rc::gen::element<std::string>("snapkv@paper", "snapkv@kvpress", "snapkv@kvcache-factory",
                                                           "snapkv@adakv") +
                           ":window=" + std::to_string(w) + ":kernel=" + std::to_string(2 * *rc::gen::inRange(0, 6) + 1) +
                           ":pooling=" + *rc::gen::element<std::string>("avg", "max", "none") +
                           ":gqa=" + *rc::gen::element<std::string>("group-then-pool", "pool-then-group") +
                           ":group_reduce=" + *rc::gen::element<std::string>("mean", "max", "sum") +
                           ":small_budget=" + *rc::gen::element<std::string>("error", "recent");
  const auto budget = *rc::gen::inRange<std::int64_t>(0, T + 3);
  const auto m = make(spec);
  RC_TAG(budget >= T ? "identity" : "compressing");
  if (budget < std::min(w, T) && spec.find("small_budget=error") != std::string::npos) {
    RC_ASSERT(kind_of([&] { m->prefill(f.input, budget); }) == ErrorKind::kImpossibleBudget);
    return;
  }
  const ref::LayerPlans out = m->prefill(f.input, budget);
  const ref::LayerScores s = m->scorer()->score(f.input, budget);
  const auto prot = m->protected_tokens(T, budget);
  RC_ASSERT(s.protected_tokens == prot);
  RC_ASSERT(static_cast<std::int64_t>(prot.size()) == std::min({w, T, budget}));
  std::vector<ref::Selection> sels;
  ref::select_per_head(s, T, out.head_budgets, "snapkv", &sels);
  RC_ASSERT(out.plans.size() == static_cast<std::size_t>(kv));
  for (std::size_t h = 0; h < out.plans.size(); ++h) {
    const Plan& p = out.plans[h];
    RC_ASSERT(out.head_budgets[h] == budget);
    RC_ASSERT(p.slots() == std::min(budget, T));
    RC_ASSERT(contains_all(p.token, prot));
    const Optimality o = optimality(p.token, s.per_kv_head[h], prot);
    RC_ASSERT(o.ok);
    if (budget < T) {
      RC_ASSERT(sels[h].ties == o.ties);  // the selection reports exactly the ties the oracle sees
      if (o.ties > 0) RC_TAG("tie at the cut");
    }
    const auto laws = m->laws();
    RC_ASSERT(ref::check_plan(p, {laws.prefill_budget, budget, laws.conservation, prot}).ok());
  }
}

TEST(SnapKV, ScoresMatchALoopTranscriptionOfTheOriginal) {
  const auto f = tests::random_layer(8, 2, 50, 8, 11);
  const auto small = tests::random_layer(4, 1, 12, 4, 12);
  for (const std::string pool : {"avg", "max", "none"})
    for (const std::string rows : {"sum", "mean"})
      for (const std::string gqa : {"group-then-pool", "pool-then-group"})
        for (const std::string group : {"mean", "max", "sum"}) {
          for (const Naive& c : {Naive{16, 5, pool, rows, gqa, group}, Naive{4, 31, pool, rows, gqa, group}}) {
            const auto& in = c.kernel == 31 ? small.input : f.input;  // kernel 31 > the 8 candidates
            const ref::LayerScores s = make(spec_of(c))->scorer()->score(in, 30);
            const auto want = naive_scores(in, c);
            ASSERT_EQ(s.per_kv_head.size(), want.size());
            for (std::size_t h = 0; h < want.size(); ++h) {
              EXPECT_LT(max_rel_diff(s.per_kv_head[h], want[h]), 1e-12) << spec_of(c) << " head " << h;
              const auto T = in.tokens();
              EXPECT_TRUE((s.per_kv_head[h].tail(std::min(c.w, T)).array() == 0).all());  // protected: unused
            }
          }
        }
}

TEST(SnapKV, GqaOrdersAgreeWhereTheTheorySaysAndDifferForMaxPooling) {
  const auto f = tests::random_layer(8, 2, 64, 8, 21);
  auto scores = [&](const std::string& extra) { return make("snapkv:window=8" + extra)->scorer()->score(f.input, 32); };
  auto diff = [](const ref::LayerScores& a, const ref::LayerScores& b) {
    double d = 0;
    for (std::size_t h = 0; h < a.per_kv_head.size(); ++h)
      d = std::max(d, (a.per_kv_head[h] - b.per_kv_head[h]).cwiseAbs().maxCoeff() / a.per_kv_head[h].cwiseAbs().maxCoeff());
    return d;
  };
  // avg_pool1d is linear: it commutes with the group mean and sum.
  for (const std::string group : {"mean", "sum"})
    EXPECT_LT(diff(scores(":pooling=avg:group_reduce=" + group + ":gqa=group-then-pool"),
                   scores(":pooling=avg:group_reduce=" + group + ":gqa=pool-then-group")), 1e-13) << group;
  for (const std::string group : {"mean", "max", "sum"})  // no pooling: the order is moot
    EXPECT_EQ(diff(scores(":pooling=none:group_reduce=" + group + ":gqa=group-then-pool"),
                   scores(":pooling=none:group_reduce=" + group + ":gqa=pool-then-group")), 0.0) << group;
  // max_pool1d is not linear: mean of maxima != maximum of means.
  EXPECT_GT(diff(scores(":pooling=max:gqa=group-then-pool"), scores(":pooling=max:gqa=pool-then-group")), 1e-3);
  EXPECT_GT(diff(scores(":pooling=avg:group_reduce=max:gqa=group-then-pool"),
                 scores(":pooling=avg:group_reduce=max:gqa=pool-then-group")), 1e-3);
  // With one q head per kv head every order is the same computation.
  const auto mha = tests::random_layer(3, 3, 40, 8, 22);
  const auto a = make("snapkv:pooling=max:window=8:gqa=group-then-pool")->scorer()->score(mha.input, 20);
  const auto b = make("snapkv:pooling=max:window=8:gqa=pool-then-group")->scorer()->score(mha.input, 20);
  EXPECT_EQ(diff(a, b), 0.0);
}

TEST(SnapKV, SumAndMeanRowsRankTheSame) {
  for (std::uint64_t seed = 30; seed < 36; ++seed) {
    const auto f = tests::random_layer(4, 2, 70, 8, seed);
    const auto ms = make("snapkv:window=10:rows=sum"), mm = make("snapkv:window=10:rows=mean");
    const auto ss = ms->scorer()->score(f.input, 30), sm = mm->scorer()->score(f.input, 30);
    for (std::size_t h = 0; h < ss.per_kv_head.size(); ++h)
      EXPECT_LT((ss.per_kv_head[h] - 10.0 * sm.per_kv_head[h]).cwiseAbs().maxCoeff(),
                1e-14 * ss.per_kv_head[h].cwiseAbs().maxCoeff());
    std::vector<ref::Selection> sel;
    ref::select_per_head(ss, 70, {30, 30}, "snapkv", &sel);
    const auto ps = ms->prefill(f.input, 30).plans, pm = mm->prefill(f.input, 30).plans;
    for (std::size_t h = 0; h < ps.size(); ++h)
      if (sel[h].margin > 1e-9) {
        EXPECT_EQ(ps[h].token, pm[h].token) << "seed " << seed << " head " << h;
      }
  }
}

TEST(SnapKV, BudgetCoveringThePromptIsTheIdentity) {
  for (std::int64_t T : {1, 5, 32, 40})  // below, at and above the window
    for (const char* spec : {"snapkv", "snapkv@kvpress", "snapkv@kvcache-factory", "snapkv@adakv"}) {
      const auto f = tests::random_layer(4, 2, T, 4, 40);
      for (std::int64_t b : {T, T + 7})
        for (const Plan& p : make(spec)->prefill(f.input, b).plans) EXPECT_EQ(p.token, Plan::identity(T).token) << spec;
    }
}

TEST(SnapKV, BudgetBelowTheWindow) {
  const auto f = tests::random_layer(2, 1, 100, 4, 41);
  // Paper: the authors' topk(C - w) has no meaning; a named error (exit 6).
  for (std::int64_t b : {0, 1, 31})
    EXPECT_EQ(kind_of([&] { make("snapkv")->prefill(f.input, b); }), ErrorKind::kImpossibleBudget) << b;
  EXPECT_EQ(kind_of([&] { make("snapkv")->protected_tokens(100, 5); }), ErrorKind::kImpossibleBudget);
  // small_budget=recent: the window shrinks to the budget, the most recent tokens.
  EXPECT_EQ(make("snapkv@kvpress")->prefill(f.input, 0).plans[0].slots(), 0);
  EXPECT_EQ(make("snapkv@kvpress")->prefill(f.input, 1).plans[0].token, (std::vector<std::int64_t>{99}));
  EXPECT_EQ(make("snapkv@kvpress")->prefill(f.input, 3).plans[0].token, (std::vector<std::int64_t>{97, 98, 99}));
  // n <= window < ... : the whole prompt is the window.
  const auto tiny = tests::random_layer(2, 1, 10, 4, 42);
  EXPECT_EQ(kind_of([&] { make("snapkv")->prefill(tiny.input, 9); }), ErrorKind::kImpossibleBudget);
  EXPECT_EQ(make("snapkv@kvpress")->prefill(tiny.input, 4).plans[0].token, (std::vector<std::int64_t>{6, 7, 8, 9}));
  // budget == window: exactly the window.
  EXPECT_EQ(make("snapkv")->prefill(f.input, 32).plans[0].token, ref::index_range(68, 100));
  // No window: budget 1 keeps the best pooled key, budget 0 nothing.
  const auto m0 = make("snapkv:window=0");
  const auto s0 = m0->scorer()->score(f.input, 1);
  Eigen::Index best = 0;
  s0.per_kv_head[0].maxCoeff(&best);
  EXPECT_EQ(m0->prefill(f.input, 1).plans[0].token, (std::vector<std::int64_t>{best}));
  EXPECT_EQ(m0->prefill(f.input, 0).plans[0].slots(), 0);
}

TEST(SnapKV, TiesNeverEvictTheWindowAndFollowTheLowerIndexRule) {
  // All keys equal: every past key scores the same (kvpress #226 evicted window
  // tokens in this situation through a sentinel that tied).
  auto f = tests::random_layer(2, 1, 40, 4, 43);
  f.input.k[0].setZero();
  const auto m = make("snapkv:window=8:pooling=none");
  const Plan p = m->prefill(f.input, 13).plans[0];
  std::vector<std::int64_t> want = ref::index_range(0, 5);
  for (std::int64_t j = 32; j < 40; ++j) want.push_back(j);
  EXPECT_EQ(p.token, want);
  std::vector<ref::Selection> sel;
  ref::select_per_head(m->scorer()->score(f.input, 13), 40, {13}, "snapkv", &sel);
  EXPECT_EQ(sel[0].margin, 0.0);
  EXPECT_EQ(sel[0].ties, 27);  // every evicted past key tied with the last kept one
}

TEST(SnapKV, PresetsPinTheirSources) {
  EXPECT_EQ(make("snapkv")->name(), make("snapkv@paper")->name());
  const std::string kvpress = make("snapkv@kvpress")->name();
  for (const char* kv : {"window=64", "rows=mean", "gqa=pool-then-group", "pooling=avg", "kernel=5"})
    EXPECT_NE(kvpress.find(kv), std::string::npos) << kv;
  const std::string ada = make("snapkv@adakv")->name();
  for (const char* kv : {"window=32", "rows=mean", "pooling=max", "kernel=7"}) EXPECT_NE(ada.find(kv), std::string::npos) << kv;
  const std::string kvcf = make("snapkv@kvcache-factory")->name();
  for (const char* kv : {"window=32", "rows=sum", "gqa=group-then-pool", "group_reduce=mean"})
    EXPECT_NE(kvcf.find(kv), std::string::npos) << kv;
  EXPECT_EQ(make("snapkv:window=8")->protected_tokens(20, 10), ref::index_range(12, 20));
  const auto f = tests::random_layer(2, 1, 20, 4, 44);
  EXPECT_EQ(make("snapkv")->decoder(f.input, {10}), nullptr);  // prefill only
  EXPECT_NE(make("snapkv")->scorer(), nullptr);
}

TEST(SnapKV, BadConfigurationIsAUsageError) {
  for (const char* bad : {"snapkv:gqa=query-head", "snapkv:gqa=sideways", "snapkv:kernel=4", "snapkv:kernel=0",
                          "snapkv:pooling=median", "snapkv:rows=max", "snapkv:window=-1", "snapkv:group_reduce=min",
                          "snapkv:small_budget=maybe", "snapkv@nope", "snapkv:bogus=1"})
    EXPECT_EQ(kind_of([&] { make(bad); }), ErrorKind::kUsage) << bad;
}
