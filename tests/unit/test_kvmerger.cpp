// KVMerger (docs/algorithms/kvmerger.md): merge sets are contiguous; inside a
// set every adjacent key pair has cos > eps and set boundaries are maximal
// (cos <= eps or a protected side); the pivot is the highest-scoring token
// (lowest index on ties) and carries the largest weight; key rows are convex,
// value rows sum to 1 or |S|; protected tokens are bit-exact; budget mode hits
// the budget with the highest-cosine edges; limits (eps > 1, sigma -> inf,
// identical keys, budget >= n, skipped layers) and parameter errors.
// Integer-valued keys and scores make exact cosine and score ties common.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/kvmerger.hpp"
#include "kvscope/reference/plan_apply.hpp"
#include "kvscope/reference/plan_checker.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope_layer.hpp"
#include "kvscope_method_test.hpp"

using namespace kvscope;

namespace {

using tests::make;
using tests::kind_of;

// A layer with integer keys/values in [-2, 2] and integer accumulated attention in [0, 3].
struct IntLayer {
  tests::LayerFixture f;
};

ref::MatX int_matrix(std::int64_t rows, int cols, int lo, int hi) {
  ref::MatX m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = *rc::gen::inRange(lo, hi + 1);
  return m;
}

tests::LayerFixture int_layer(int kv, int g, std::int64_t T, int d) {
  tests::LayerFixture f = tests::random_layer(kv * g, kv, T, d, 5);
  for (int h = 0; h < kv; ++h) {
    f.input.k[static_cast<std::size_t>(h)] = int_matrix(T, d, -2, 2);
    f.input.v[static_cast<std::size_t>(h)] = int_matrix(T, d, -2, 2);
  }
  for (int h = 0; h < kv * g; ++h) {
    ref::VecX a(T);
    for (std::int64_t j = 0; j < T; ++j) a[j] = *rc::gen::inRange(0, 4);
    f.input.attn_colsum.push_back(a);
  }
  return f;
}

// Independent reference pieces.
double cosine(const ref::MatX& K, std::int64_t a, std::int64_t b) {
  const double na = K.row(a).norm(), nb = K.row(b).norm();
  if (na == 0 && nb == 0) return 1;
  if (na == 0 || nb == 0) return 0;
  return std::clamp(K.row(a).dot(K.row(b)) / (na * nb), -1.0, 1.0);
}

ref::VecX group_score(const ref::LayerInput& in, int kv, const std::string& rule) {
  const int g = static_cast<int>(in.q.size() / in.k.size());
  ref::VecX s = in.attn_colsum[static_cast<std::size_t>(kv * g)];
  for (int q = 1; q < g; ++q) {
    const ref::VecX& x = in.attn_colsum[static_cast<std::size_t>(kv * g + q)];
    s = rule == "max" ? ref::VecX(s.cwiseMax(x)) : ref::VecX(s + x);
  }
  if (rule == "mean") s /= g;
  return s;
}

std::int64_t ceil_share(double share, std::int64_t n) {
  return std::clamp<std::int64_t>(static_cast<std::int64_t>(std::ceil(share * static_cast<double>(n) - 1e-9)), 0, n);
}

// recent band + heavy hitters (best score, lower index first) outside it.
std::vector<char> protected_set(const ref::VecX& score, std::int64_t T, double recent, double heavy) {
  std::vector<char> p(static_cast<std::size_t>(T), 0);
  const std::int64_t r = ceil_share(recent, T);
  for (std::int64_t j = T - r; j < T; ++j) p[static_cast<std::size_t>(j)] = 1;
  std::vector<std::int64_t> order;
  for (std::int64_t j = 0; j < T - r; ++j) order.push_back(j);
  std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return score[a] > score[b]; });
  const std::int64_t h = std::min(ceil_share(heavy, T), T - r);
  for (std::int64_t i = 0; i < h; ++i) p[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])] = 1;
  return p;
}

struct Row {
  std::vector<std::int64_t> tokens;
  std::vector<double> ck, cv;
  std::int64_t position, count;
};

std::vector<Row> rows_of(const Plan& p) {
  std::vector<Row> out;
  for (std::int64_t i = 0; i < p.slots(); ++i) {
    Row r{{}, {}, {}, p.position[static_cast<std::size_t>(i)], p.count[static_cast<std::size_t>(i)]};
    for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e) {
      r.tokens.push_back(p.token[static_cast<std::size_t>(e)]);
      r.ck.push_back(p.coef_k[static_cast<std::size_t>(e)]);
      r.cv.push_back(p.coef_v[static_cast<std::size_t>(e)]);
    }
    out.push_back(std::move(r));
  }
  return out;
}

// The structural invariants every mode shares; returns the merged-edge flags.
std::vector<char> check_structure(const Plan& p, const ref::MatX& K, const ref::MatX& V, const ref::VecX& score,
                                  const std::vector<char>& prot, bool scaled, const std::string& sigma_mode,
                                  double sigma) {
  const std::int64_t T = K.rows();
  std::vector<char> merged(static_cast<std::size_t>(std::max<std::int64_t>(T - 1, 0)), 0);
  std::int64_t next = 0;
  const ref::HeadCache c = ref::apply_plan(p, K, V, 10000.0);
  for (const Row& r : rows_of(p)) {
    // Contiguous, in order, partitioning [0, T).
    for (std::size_t k = 0; k < r.tokens.size(); ++k) RC_ASSERT(r.tokens[k] == next + static_cast<std::int64_t>(k));
    next += static_cast<std::int64_t>(r.tokens.size());
    RC_ASSERT(r.count == static_cast<std::int64_t>(r.tokens.size()));
    if (r.tokens.size() == 1) {
      RC_ASSERT(r.ck[0] == 1.0);
      RC_ASSERT(r.cv[0] == 1.0);
      RC_ASSERT(r.position == r.tokens[0]);
      continue;
    }
    for (std::size_t k = 0; k + 1 < r.tokens.size(); ++k) {
      merged[static_cast<std::size_t>(r.tokens[k])] = 1;
      RC_ASSERT(!prot[static_cast<std::size_t>(r.tokens[k])]);
      RC_ASSERT(!prot[static_cast<std::size_t>(r.tokens[k + 1])]);
    }
    // Pivot: the highest score, lowest index on ties; its weight is the largest.
    std::size_t piv = 0;
    for (std::size_t k = 1; k < r.tokens.size(); ++k)
      if (score[r.tokens[k]] > score[r.tokens[piv]]) piv = k;
    RC_ASSERT(r.position == r.tokens[piv]);
    double sk = 0, sv = 0;
    for (std::size_t k = 0; k < r.tokens.size(); ++k) {
      RC_ASSERT(r.ck[k] >= 0.0);
      RC_ASSERT(r.ck[k] <= r.ck[piv]);
      sk += r.ck[k];
      sv += r.cv[k];
      const double want_v = scaled ? static_cast<double>(r.tokens.size()) * r.ck[k] : r.ck[k];
      RC_ASSERT(r.cv[k] == want_v);
    }
    RC_ASSERT(std::abs(sk - 1.0) < 1e-12);
    RC_ASSERT(std::abs(sv - (scaled ? static_cast<double>(r.tokens.size()) : 1.0)) < 1e-12 * static_cast<double>(r.tokens.size()));
    // Eq. 4 weights, recomputed (literal sigma is covered by its own test).
    if (sigma_mode != "literal") {
      std::vector<double> d(r.tokens.size());
      double mean = 0;
      for (std::size_t k = 0; k < d.size(); ++k) {
        d[k] = (K.row(r.tokens[piv]) - K.row(r.tokens[k])).norm();
        mean += d[k];
      }
      const double s = sigma_mode == "fixed" ? sigma : mean / (std::sqrt(2.0) * static_cast<double>(d.size()));
      double tot = 0;
      std::vector<double> gk(d.size());
      for (std::size_t k = 0; k < d.size(); ++k) tot += gk[k] = s > 0 ? std::exp(-d[k] * d[k] / (2 * s * s)) : 1.0;
      for (std::size_t k = 0; k < d.size(); ++k) RC_ASSERT(std::abs(r.ck[k] - gk[k] / tot) < 1e-12);
    }
  }
  RC_ASSERT(next == T);
  // Protected tokens: their own slot, bit-exact key and value.
  for (std::int64_t i = 0; i < p.slots(); ++i)
    if (p.row_end(i) - p.row_begin(i) == 1) {
      const std::int64_t j = p.token[static_cast<std::size_t>(p.row_begin(i))];
      RC_ASSERT(c.K.row(i) == K.row(j));
      RC_ASSERT(c.V.row(i) == V.row(j));
    }
  return merged;
}

std::vector<std::int64_t> protected_list(const std::vector<char>& prot) {
  std::vector<std::int64_t> out;
  for (std::size_t j = 0; j < prot.size(); ++j)
    if (prot[j]) out.push_back(static_cast<std::int64_t>(j));
  return out;
}

}  // namespace

RC_GTEST_PROP(KVMerger, ThresholdSetsAreMaximalContiguousRunsAboveEps, ()) {
  const int kv = *rc::gen::inRange(1, 3), g = *rc::gen::inRange(1, 9), d = *rc::gen::inRange(1, 4);
  const auto T = *rc::gen::inRange<std::int64_t>(1, 40);
  const double eps = *rc::gen::element(-1.5, -0.5, 0.0, 0.5, 0.75, 0.9, 1.0);
  const double recent = *rc::gen::element(0.0, 0.05, 0.2), heavy = *rc::gen::element(0.0, 0.1, 0.3);
  const auto values = *rc::gen::element<std::string>("scaled", "convex");
  const auto sigma_mode = *rc::gen::element<std::string>("mean_dist_over_sqrt2", "fixed", "literal");
  const double sigma = *rc::gen::element(0.5, 5.0);
  const auto rule = *rc::gen::element<std::string>("mean", "max", "sum");
  const auto budget = *rc::gen::inRange<std::int64_t>(0, T);  // < T: compression runs
  auto f = int_layer(kv, g, T, d);
  const auto m = make("kvmerger:mode=threshold:protect_unit=fraction:eps=" + std::to_string(eps) +
                      ":recent=" + std::to_string(recent) + ":heavy=" + std::to_string(heavy) + ":values=" + values +
                      ":sigma_mode=" + sigma_mode + ":sigma=" + std::to_string(sigma) + ":gqa=" + rule);
  const ref::LayerPlans out = m->prefill(f.input, budget);
  RC_ASSERT(out.plans.size() == static_cast<std::size_t>(kv));
  const auto laws = m->laws();
  RC_ASSERT(laws.prefill_budget == ref::BudgetLaw::kNone);
  RC_ASSERT(laws.conservation ==
            (values == "scaled" ? ref::ConservationLaw::kMergeScaledValues : ref::ConservationLaw::kRowConvex));
  for (int h = 0; h < kv; ++h) {
    const Plan& p = out.plans[static_cast<std::size_t>(h)];
    const ref::MatX& K = f.input.k[static_cast<std::size_t>(h)];
    const ref::VecX score = group_score(f.input, h, rule);
    const std::vector<char> prot = protected_set(score, T, recent, heavy);
    RC_ASSERT(ref::check_plan(p, {laws.prefill_budget, budget, laws.conservation, protected_list(prot)}).ok());
    const std::vector<char> merged =
        check_structure(p, K, f.input.v[static_cast<std::size_t>(h)], score, prot, values == "scaled", sigma_mode, sigma);
    // Chaining rule: an edge is merged iff both ends are unprotected and cos > eps.
    for (std::int64_t j = 0; j + 1 < T; ++j) {
      const bool eligible = !prot[static_cast<std::size_t>(j)] && !prot[static_cast<std::size_t>(j + 1)];
      RC_ASSERT(static_cast<bool>(merged[static_cast<std::size_t>(j)]) == (eligible && cosine(K, j, j + 1) > eps));
    }
    RC_TAG(p.slots() < T ? "merged" : "nothing merged");
  }
}

RC_GTEST_PROP(KVMerger, BudgetModeMergesTheHighestCosineEdgesToExactlyB, ()) {
  const int kv = *rc::gen::inRange(1, 3), g = *rc::gen::inRange(1, 5), d = *rc::gen::inRange(1, 4);
  const auto T = *rc::gen::inRange<std::int64_t>(1, 40);
  const double recent = *rc::gen::element(0.0, 0.1), heavy = *rc::gen::element(0.0, 0.1);
  const auto values = *rc::gen::element<std::string>("scaled", "convex");
  const auto budget = *rc::gen::inRange<std::int64_t>(0, T + 3);
  auto f = int_layer(kv, g, T, d);
  const auto m = make("kvmerger@budget:protect_unit=fraction:recent=" + std::to_string(recent) +
                      ":heavy=" + std::to_string(heavy) + ":values=" + values);
  RC_ASSERT(m->laws().prefill_budget == ref::BudgetLaw::kExact);
  // Independent feasibility: T - B merges need that many unprotected adjacent pairs.
  bool feasible = true;
  for (int h = 0; h < kv; ++h) {
    const std::vector<char> prot = protected_set(group_score(f.input, h, "mean"), T, recent, heavy);
    std::int64_t eligible = 0;
    for (std::int64_t j = 0; j + 1 < T; ++j) eligible += !prot[static_cast<std::size_t>(j)] && !prot[static_cast<std::size_t>(j + 1)];
    if (T > budget && eligible < T - budget) feasible = false;
  }
  ref::LayerPlans out;
  try {
    out = m->prefill(f.input, budget);
  } catch (const Error& e) {
    RC_ASSERT(e.kind() == ErrorKind::kImpossibleBudget);
    RC_ASSERT(!feasible);
    RC_TAG("impossible");
    return;
  }
  RC_ASSERT(feasible);
  for (int h = 0; h < kv; ++h) {
    const Plan& p = out.plans[static_cast<std::size_t>(h)];
    RC_ASSERT(p.slots() == std::min(budget, T));
    const ref::MatX& K = f.input.k[static_cast<std::size_t>(h)];
    const ref::VecX score = group_score(f.input, h, "mean");
    const std::vector<char> prot = protected_set(score, T, recent, heavy);
    const auto laws = m->laws();
    RC_ASSERT(ref::check_plan(p, {laws.prefill_budget, budget, laws.conservation, protected_list(T > budget ? prot : std::vector<char>(static_cast<std::size_t>(T), 0))}).ok());
    if (T <= budget) {
      RC_ASSERT(p.slots() == T);
      continue;
    }
    const std::vector<char> merged =
        check_structure(p, K, f.input.v[static_cast<std::size_t>(h)], score, prot, values == "scaled",
                        "mean_dist_over_sqrt2", 5.0);
    // Every merged edge is at least as similar as every unmerged eligible one
    // (ties between them are decided lower index first).
    double min_merged = 2, max_rest = -2;
    for (std::int64_t j = 0; j + 1 < T; ++j) {
      if (prot[static_cast<std::size_t>(j)] || prot[static_cast<std::size_t>(j + 1)]) continue;
      const double c = cosine(K, j, j + 1);
      if (merged[static_cast<std::size_t>(j)]) min_merged = std::min(min_merged, c);
      else max_rest = std::max(max_rest, c);
    }
    RC_ASSERT(min_merged >= max_rest);
    RC_TAG(min_merged == max_rest ? "tie at the cut" : "clean cut");
  }
}

RC_GTEST_PROP(KVMerger, CappedModeMergesEveryEdgeAboveEpsAndStaysWithinBudget, ()) {
  const auto T = *rc::gen::inRange<std::int64_t>(2, 40);
  const auto budget = *rc::gen::inRange<std::int64_t>(1, T + 2);
  auto f = int_layer(1, 2, T, 2);
  const auto m = make("kvmerger:mode=capped:recent=0:heavy=0:eps=0.5");
  RC_ASSERT(m->laws().prefill_budget == ref::BudgetLaw::kAtMost);
  const Plan p = m->prefill(f.input, budget).plans.front();
  RC_ASSERT(p.slots() <= budget);
  const std::vector<char> none(static_cast<std::size_t>(T), 0);
  const std::vector<char> merged = check_structure(p, f.input.k[0], f.input.v[0], group_score(f.input, 0, "mean"), none,
                                                   true, "mean_dist_over_sqrt2", 5.0);
  if (T > budget)
    for (std::int64_t j = 0; j + 1 < T; ++j)
      if (cosine(f.input.k[0], j, j + 1) > 0.5) RC_ASSERT(merged[static_cast<std::size_t>(j)] != 0);
}

RC_GTEST_PROP(KVMerger, LiteralSigmaIsTheFixedPointOfEq4, ()) {
  const auto n = *rc::gen::inRange<std::int64_t>(1, 8);
  tests::LayerFixture f = tests::random_layer(1, 1, n, 3, *rc::gen::inRange(0, 1000));
  std::vector<std::int64_t> set;
  for (std::int64_t j = 0; j < n; ++j) set.push_back(j);
  const auto piv = static_cast<std::size_t>(*rc::gen::inRange<std::int64_t>(0, n));
  ref::KVMergerConfig c;
  c.sigma_mode = ref::KVMergerConfig::Sigma::kLiteral;
  double sigma = 0;
  const std::vector<double> w = ref::kvmerger_weights(f.input.k[0], set, piv, c, &sigma);
  double g = 0;
  for (std::int64_t j = 0; j < n; ++j)
    g += std::exp(-(f.input.k[0].row(set[piv]) - f.input.k[0].row(j)).squaredNorm() / (2 * sigma * sigma));
  RC_ASSERT(std::abs(sigma - g / (std::sqrt(2.0) * static_cast<double>(n))) < 1e-12);
  RC_ASSERT(sigma <= 1.0 / std::sqrt(2.0) + 1e-15);
  for (double x : w) RC_ASSERT(x <= w[piv]);
}

TEST(KVMerger, EpsAboveOneMergesNothing) {
  auto f = tests::random_layer(4, 2, 30, 4, 1);
  for (const char* mode : {"threshold"}) {
    const auto m = make(std::string("kvmerger:mode=") + mode + ":eps=1.01:recent=0:heavy=0");
    for (const Plan& p : m->prefill(f.input, 10).plans) {
      ASSERT_EQ(p.slots(), 30);
      for (std::int64_t i = 0; i < 30; ++i) EXPECT_EQ(p.token[static_cast<std::size_t>(i)], i);
    }
  }
  // ... even for identical keys (cos = 1 is not > eps).
  f.input.k[0].rowwise() = f.input.k[0].row(0).eval();
  EXPECT_EQ(make("kvmerger:eps=1.0:recent=0:heavy=0")->prefill(f.input, 10).plans[0].slots(), 30);
  EXPECT_EQ(make("kvmerger:eps=0.99:recent=0:heavy=0")->prefill(f.input, 10).plans[0].slots(), 1);
}

TEST(KVMerger, SigmaToInfinityGivesTheMean) {
  auto f = tests::random_layer(2, 1, 12, 4, 2);
  const Plan p = make("kvmerger:eps=-2:recent=0:heavy=0:values=convex:sigma_mode=fixed:sigma=1e150")
                     ->prefill(f.input, 5).plans[0];
  ASSERT_EQ(p.slots(), 1);  // eps = -2: every edge merges
  for (double w : p.coef_k) EXPECT_EQ(w, 1.0 / 12.0);
  const ref::HeadCache c = ref::apply_plan(p, f.input.k[0], f.input.v[0], 10000.0);
  const Eigen::RowVectorXd mean = f.input.k[0].colwise().mean();
  EXPECT_LT((c.K.row(0) - mean).norm(), 1e-12);
  EXPECT_LT((c.V.row(0) - f.input.v[0].colwise().mean()).norm(), 1e-12);
  // sigma -> 0+ copies the pivot (the other weights underflow to 0).
  const Plan q = make("kvmerger:eps=-2:recent=0:heavy=0:values=convex:sigma_mode=fixed:sigma=1e-200")
                     ->prefill(f.input, 5).plans[0];
  const ref::HeadCache cq = ref::apply_plan(q, f.input.k[0], f.input.v[0], 10000.0);
  EXPECT_TRUE(cq.K.row(0) == f.input.k[0].row(q.position[0]));
}

TEST(KVMerger, IdenticalKeysMergeIntoThePivotUnchanged) {
  auto f = tests::random_layer(2, 1, 16, 4, 3);
  f.input.k[0].rowwise() = f.input.k[0].row(5).eval();
  ref::VecX a = ref::VecX::Ones(16);
  a[9] = 7;  // the pivot
  f.input.attn_colsum = {a, a};
  const Plan p = make("kvmerger:recent=0:heavy=0")->prefill(f.input, 4).plans[0];
  ASSERT_EQ(p.slots(), 1);
  EXPECT_EQ(p.position[0], 9);
  EXPECT_EQ(p.count[0], 16);
  for (std::int64_t e = 0; e < p.nnz(); ++e) EXPECT_EQ(p.coef_k[static_cast<std::size_t>(e)], 1.0 / 16);  // sigma = 0 guard
  const ref::HeadCache c = ref::apply_plan(p, f.input.k[0], f.input.v[0], 10000.0);
  EXPECT_LT((c.K.row(0) - f.input.k[0].row(9)).norm(), 1e-14);
  // Paper scaling: the value row sums to |S| (16 times the mean value).
  EXPECT_LT((c.V.row(0) - 16.0 * f.input.v[0].colwise().mean()).norm(), 1e-12);
}

TEST(KVMerger, PivotTiesGoToTheLowestIndex) {
  auto f = tests::random_layer(1, 1, 8, 2, 4);
  f.input.k[0].rowwise() = f.input.k[0].row(0).eval();
  ref::VecX a = ref::VecX::Zero(8);
  a[3] = a[6] = 2;
  f.input.attn_colsum = {a};
  EXPECT_EQ(make("kvmerger:recent=0:heavy=0")->prefill(f.input, 1).plans[0].position[0], 3);
}

TEST(KVMerger, BudgetCoveringThePromptIsTheIdentity) {
  auto f = tests::random_layer(4, 2, 20, 4, 5);
  for (const char* spec : {"kvmerger", "kvmerger@budget", "kvmerger:mode=capped", "kvmerger:eps=-2"})
    for (std::int64_t b : {20, 21, 1000})
      for (const Plan& p : make(spec)->prefill(f.input, b).plans) {
        ASSERT_EQ(p.slots(), 20) << spec << " " << b;
        for (std::int64_t i = 0; i < 20; ++i) EXPECT_EQ(p.coef_k[static_cast<std::size_t>(i)], 1.0);
      }
}

TEST(KVMerger, ProtectedRecentAndHeavyTokensStayAlone) {
  auto f = tests::random_layer(2, 1, 100, 4, 6);
  f.input.k[0].rowwise() = f.input.k[0].row(0).eval();  // everything else would merge
  ref::VecX a = ref::VecX::Ones(100);
  a[40] = 9;
  a[41] = 8;
  f.input.attn_colsum = {a, a};
  // fraction: 3 recent, 2 heavy (40, 41).
  const auto m = make("kvmerger:protect_unit=fraction:recent=0.03:heavy=0.02");
  const Plan p = m->prefill(f.input, 10).plans[0];
  // Sets: [0, 40), 40, 41, [42, 97), 97, 98, 99.
  ASSERT_EQ(p.slots(), 7);
  const std::vector<std::int64_t> protect = {40, 41, 97, 98, 99};
  EXPECT_TRUE(ref::check_plan(p, {ref::BudgetLaw::kNone, 10, m->laws().conservation, protect}).ok());
  EXPECT_EQ(m->protected_tokens(100, 10), (std::vector<std::int64_t>{97, 98, 99}));
  // percent: 0.17% and 0.12% of 100 round up to one token each.
  const Plan q = make("kvmerger")->prefill(f.input, 10).plans[0];
  ASSERT_EQ(q.slots(), 4);  // [0, 40), 40, [41, 99), 99
  EXPECT_EQ(make("kvmerger")->protected_tokens(100, 10), (std::vector<std::int64_t>{99}));
}

TEST(KVMerger, SkippedLayersAreUntouched) {
  auto f = tests::random_layer(2, 1, 12, 4, 7);
  f.meta->layers = 4;
  const auto m = make("kvmerger@v1:eps=-2");
  EXPECT_EQ(m->laws().allocation, ref::AllocationLaw::kPerLayer);
  for (int l = 0; l < 4; ++l) {
    f.input.layer = l;
    const ref::LayerPlans out = m->prefill(f.input, 5);
    const bool skipped = l != 2;
    EXPECT_EQ(out.plans[0].slots() == 12, skipped) << l;
    EXPECT_EQ(out.head_budgets[0], skipped ? 12 : 5) << l;
    EXPECT_TRUE(ref::check_allocation(out.head_budgets, 5, m->laws().allocation).ok());
  }
  EXPECT_EQ(make("kvmerger")->laws().allocation, ref::AllocationLaw::kUniform);
}

TEST(KVMerger, ImpossibleBudgetsAndBadParameters) {
  auto f = tests::random_layer(2, 1, 10, 4, 8);
  // 5 protected recent tokens + 1 run of 5 unprotected ones: at least 6 slots.
  const auto m = make("kvmerger@budget:protect_unit=fraction:recent=0.5:heavy=0");
  EXPECT_EQ(m->prefill(f.input, 6).plans[0].slots(), 6);
  EXPECT_EQ(kind_of([&] { m->prefill(f.input, 5); }), ErrorKind::kImpossibleBudget);
  EXPECT_EQ(kind_of([&] { make("kvmerger:mode=capped:protect_unit=fraction:recent=0.5:heavy=0")->prefill(f.input, 0); }),
            ErrorKind::kImpossibleBudget);
  for (const char* bad : {"kvmerger:eps=abc", "kvmerger:sigma=0", "kvmerger:sigma_mode=median", "kvmerger:recent=200",
                          "kvmerger:protect_unit=fraction:heavy=1.5", "kvmerger:values=sum", "kvmerger:mode=auto",
                          "kvmerger:skip_layers=a,b", "kvmerger:gqa=min", "kvmerger:skip_layers=1x"})
    EXPECT_EQ(kind_of([&] { make(bad); }), ErrorKind::kUsage) << bad;
}

TEST(KVMerger, PresetsPinTheirChoices) {
  EXPECT_EQ(make("kvmerger")->name(), make("kvmerger@paper")->name());
  EXPECT_EQ(make("kvmerger")->laws().conservation, ref::ConservationLaw::kMergeScaledValues);
  EXPECT_EQ(make("kvmerger@budget")->laws().conservation, ref::ConservationLaw::kRowConvex);
  EXPECT_EQ(make("kvmerger@budget")->laws().prefill_budget, ref::BudgetLaw::kExact);
  EXPECT_EQ(make("kvmerger@paper35")->laws().prefill_budget, ref::BudgetLaw::kNone);
  EXPECT_EQ(make("kvmerger")->decoder(tests::random_layer(1, 1, 3, 2, 1).input, {3}), nullptr);
}
