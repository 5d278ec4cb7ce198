// The perturbation bound (reference/perturbation_bound.hpp) on random plans of
// every shape: the measured ||o' - o|| never exceeds it, it is zero for the
// identity, and for pure eviction it is at most 2 eps max||v||.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include "kvscope/reference/perturbation_bound.hpp"
#include "kvscope/reference/plan_apply.hpp"

using namespace kvscope;
using ref::MatX;
using ref::VecX;

namespace {

MatX random_matrix(std::int64_t rows, std::int64_t cols) {
  MatX m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = *rc::gen::inRange(-3000, 3001) / 1000.0;
  return m;
}

enum class Shape { kEvict, kValueMerge, kKeyValueMerge, kValueHandOff };

// Tokens split into runs; each run is dropped, kept one-hot, or becomes one slot
// whose rows depend on the shape (convex merges, or CaM-like value hand-off).
Plan random_plan(std::int64_t n, Shape shape) {
  Plan p;
  p.n = n;
  std::int64_t j = 0;
  while (j < n) {
    const std::int64_t len = std::min<std::int64_t>(n - j, *rc::gen::inRange<std::int64_t>(1, 4));
    const int action = *rc::gen::inRange(0, 3);  // 0 drop, 1 keep each, 2 one slot for the run
    if (action == 1 || (action == 2 && (shape == Shape::kEvict || len == 1))) {
      for (std::int64_t t = j; t < j + len; ++t) p.add_kept(t);
    } else if (action == 2) {
      std::vector<std::int64_t> toks;
      std::vector<double> ck, cv;
      const std::int64_t pivot = j + *rc::gen::inRange<std::int64_t>(0, len);
      double wsum = 0;
      std::vector<double> w;
      for (std::int64_t t = j; t < j + len; ++t) {
        w.push_back(*rc::gen::inRange(1, 10));
        wsum += w.back();
      }
      for (std::int64_t t = j; t < j + len; ++t) {
        const double wt = w[static_cast<std::size_t>(t - j)] / wsum;
        toks.push_back(t);
        switch (shape) {
          case Shape::kValueMerge: ck.push_back(t == pivot ? 1.0 : 0.0); cv.push_back(wt); break;
          case Shape::kKeyValueMerge: ck.push_back(wt); cv.push_back(wt); break;
          case Shape::kValueHandOff: ck.push_back(t == pivot ? 1.0 : 0.0); cv.push_back(t == pivot ? 1.0 : 0.5); break;
          case Shape::kEvict: break;
        }
      }
      p.add_row(toks, ck, cv, pivot, len);
    }
    j += len;
  }
  if (p.slots() == 0) p.add_kept(n - 1);  // a query always has something to attend to
  return p;
}

}  // namespace

RC_GTEST_PROP(PerturbationBound, MeasuredErrorNeverExceedsTheBound, ()) {
  const auto n = *rc::gen::inRange<std::int64_t>(1, 30);
  const auto d = 2 * *rc::gen::inRange<std::int64_t>(1, 5);
  const auto shape = *rc::gen::element(Shape::kEvict, Shape::kValueMerge, Shape::kKeyValueMerge, Shape::kValueHandOff);
  const MatX K = random_matrix(n, d), V = random_matrix(n, d);
  const VecX q = random_matrix(d, 1).col(0);
  const Plan plan = random_plan(n, shape);
  const ref::HeadCache c = ref::apply_plan(plan, K, V, 10000.0);
  const auto full = ref::attend(q, K, V), comp = ref::attend(q, c.K, c.V);
  const ref::PerturbationBound b = ref::perturbation_bound(plan, full.probs, V, c.V, comp.probs);
  const double err = (comp.output - full.output).norm();
  RC_TAG(ref::bound_kind_name(b.kind));
  RC_ASSERT(err <= b.value * (1 + 1e-9) + 1e-12);
  RC_ASSERT((shape != Shape::kKeyValueMerge) == (b.kind == ref::BoundKind::kKeysKept) ||
            plan.nnz() == plan.slots());  // a merge of single tokens is still keys-kept
}

RC_GTEST_PROP(PerturbationBound, EvictionIsWithinTwoEpsMaxNorm, ()) {
  const auto n = *rc::gen::inRange<std::int64_t>(1, 30);
  const MatX K = random_matrix(n, 4), V = random_matrix(n, 4);
  const VecX q = random_matrix(4, 1).col(0);
  const Plan plan = random_plan(n, Shape::kEvict);
  const ref::HeadCache c = ref::apply_plan(plan, K, V, 10000.0);
  const auto full = ref::attend(q, K, V), comp = ref::attend(q, c.K, c.V);
  double eps = 1.0;
  for (std::int64_t i = 0; i < plan.slots(); ++i) eps -= full.probs[plan.token[static_cast<std::size_t>(i)]];
  const double b = ref::perturbation_bound(plan, full.probs, V, c.V, comp.probs).value;
  RC_ASSERT(b <= 2 * std::max(0.0, eps) * V.rowwise().norm().maxCoeff() + 1e-12);
}

TEST(PerturbationBound, IdentityHasZeroBound) {
  const MatX K = MatX::Random(9, 4), V = MatX::Random(9, 4);
  const VecX q = VecX::Random(4);
  const Plan plan = Plan::identity(9);
  const auto full = ref::attend(q, K, V);
  EXPECT_EQ(ref::perturbation_bound(plan, full.probs, V, V, full.probs).value, 0.0);
}

TEST(PerturbationBound, CatchesAWrongCache) {
  // Anti-vacuity: a cache that does not match its plan breaks the bound.
  const MatX K = MatX::Random(9, 4), V = MatX::Random(9, 4);
  const VecX q = VecX::Random(4);
  const Plan plan = Plan::identity(9);
  MatX wrong_V = V;
  wrong_V.row(3) *= 5.0;
  const auto full = ref::attend(q, K, V), comp = ref::attend(q, K, wrong_V);
  const double b = ref::perturbation_bound(plan, full.probs, V, V, full.probs).value;
  EXPECT_GT((comp.output - full.output).norm(), b);
}

TEST(PerturbationBound, KeysKeptNeedsOriginalPositionsAndUnitKeys) {
  Plan p = Plan::identity(4);
  EXPECT_TRUE(ref::keys_kept(p));
  p.positions = PositionMode::kRerotated;
  EXPECT_FALSE(ref::keys_kept(p));
  Plan m;
  m.n = 2;
  const std::vector<std::int64_t> toks{0, 1};
  const std::vector<double> half{0.5, 0.5};
  m.add_row(toks, half, half, 0, 2);
  EXPECT_FALSE(ref::keys_kept(m));
}

TEST(PerturbationBound, ValueShiftAloneIsBounded) {
  // Every key kept (eps = 0), one value merged with its neighbour: the whole
  // error comes from the value term of the keys-kept bound.
  const MatX K = (MatX(3, 2) << 1, 0, 0, 1, 1, 1).finished();
  const MatX V = (MatX(3, 2) << 1, 2, -3, 0.5, 0, 4).finished();
  const VecX q = (VecX(2) << 0.3, -0.2).finished();
  Plan p;
  p.n = 3;
  const std::vector<std::int64_t> toks{0, 1};
  const std::vector<double> ck{1.0, 0.0}, cv{0.5, 0.5};
  p.add_row(toks, ck, cv, 0, 1);
  p.add_kept(1);
  p.add_kept(2);
  const ref::HeadCache c = ref::apply_plan(p, K, V, 10000.0);
  const auto full = ref::attend(q, K, V), comp = ref::attend(q, c.K, c.V);
  const ref::PerturbationBound b = ref::perturbation_bound(p, full.probs, V, c.V, comp.probs);
  const double err = (comp.output - full.output).norm();
  EXPECT_EQ(b.kind, ref::BoundKind::kKeysKept);
  EXPECT_GT(err, 0.1);
  EXPECT_LE(err, b.value * (1 + 1e-12));
}
