// Reference attention against a naive loop, softmax invariances, metamorphic
// properties (DESIGN.md section 4.6) and RoPE algebra. Property seeds are
// fixed by RC_PARAMS in ctest and printed by RapidCheck.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <cmath>
#include <numeric>
#include <random>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/attention.hpp"
#include "kvscope_test_gen.hpp"

using namespace kvscope;
using ref::MatX;
using ref::VecX;
using tests::grid_matrix;
using tests::grid_vector;

namespace {

// The textbook formula with plain loops: the independent oracle.
VecX naive_attention(const VecX& q, const MatX& K, const MatX& V) {
  const auto n = K.rows(), d = K.cols();
  std::vector<double> w(static_cast<std::size_t>(n));
  double mx = -INFINITY;
  for (Eigen::Index j = 0; j < n; ++j) {
    double dot = 0;
    for (Eigen::Index i = 0; i < d; ++i) dot += q[i] * K(j, i);
    w[static_cast<std::size_t>(j)] = dot / std::sqrt(static_cast<double>(d));
    mx = std::max(mx, w[static_cast<std::size_t>(j)]);
  }
  double z = 0;
  for (double& x : w) z += (x = std::exp(x - mx));
  VecX o = VecX::Zero(V.cols());
  for (Eigen::Index j = 0; j < n; ++j)
    for (Eigen::Index i = 0; i < V.cols(); ++i) o[i] += w[static_cast<std::size_t>(j)] / z * V(j, i);
  return o;
}

}  // namespace

RC_GTEST_PROP(Attention, MatchesNaiveLoop, ()) {
  const auto n = *rc::gen::inRange<std::int64_t>(1, 40);
  const auto d = *rc::gen::inRange<std::int64_t>(1, 17);
  const VecX q = *grid_vector(d);
  const MatX K = *grid_matrix(n, d), V = *grid_matrix(n, d);
  const VecX o = ref::attend(q, K, V).output;
  RC_ASSERT((o - naive_attention(q, K, V)).norm() <= 1e-12 * (1 + o.norm()));
}

RC_GTEST_PROP(Attention, ProbabilitiesSumToOneAndAreNonNegative, ()) {
  const auto n = *rc::gen::inRange<std::int64_t>(1, 60);
  const VecX logits = *grid_vector(n, 64);
  const VecX p = ref::softmax(logits);
  RC_ASSERT(std::abs(p.sum() - 1.0) < 1e-12);
  RC_ASSERT(p.minCoeff() >= 0.0);
}

RC_GTEST_PROP(Attention, SoftmaxIgnoresAConstantShift, ()) {
  const auto n = *rc::gen::inRange<std::int64_t>(1, 30);
  const VecX logits = *grid_vector(n, 8);
  const double c = *tests::grid_double(1000);
  RC_ASSERT((ref::softmax(logits) - ref::softmax(logits.array() + c).matrix()).norm() < 1e-12);
}

RC_GTEST_PROP(Attention, PermutingSlotsLeavesOutputUnchanged, ()) {
  const auto n = *rc::gen::inRange<std::int64_t>(1, 30);
  const auto d = *rc::gen::inRange<std::int64_t>(1, 9);
  const VecX q = *grid_vector(d);
  const MatX K = *grid_matrix(n, d), V = *grid_matrix(n, d);
  std::vector<int> perm(static_cast<std::size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937 rng(*rc::gen::arbitrary<unsigned>());
  std::shuffle(perm.begin(), perm.end(), rng);
  MatX Kp(n, d), Vp(n, d);
  for (Eigen::Index j = 0; j < n; ++j) {
    Kp.row(j) = K.row(perm[static_cast<std::size_t>(j)]);
    Vp.row(j) = V.row(perm[static_cast<std::size_t>(j)]);
  }
  RC_ASSERT((ref::attend(q, K, V).output - ref::attend(q, Kp, Vp).output).norm() < 1e-12);
}

RC_GTEST_PROP(Attention, ScalingValuesScalesTheOutput, ()) {
  const auto n = *rc::gen::inRange<std::int64_t>(1, 20);
  const auto d = *rc::gen::inRange<std::int64_t>(1, 9);
  const VecX q = *grid_vector(d);
  const MatX K = *grid_matrix(n, d), V = *grid_matrix(n, d);
  const double a = *tests::grid_double(8);
  RC_ASSERT((ref::attend(q, K, a * V).output - a * ref::attend(q, K, V).output).norm() < 1e-12 * (1 + V.norm()));
}

TEST(Attention, HugeLogitsDoNotOverflow) {
  VecX logits(3);
  logits << 1e300, 1e300 - 1e290, -1e300;
  const VecX p = ref::softmax(logits);
  EXPECT_TRUE(p.allFinite());
  EXPECT_DOUBLE_EQ(p[0], 1.0);
}

TEST(Attention, MinusInfinityGetsZeroAndFullyMaskedIsAnError) {
  VecX logits(2);
  logits << 0.0, -INFINITY;
  EXPECT_EQ(ref::softmax(logits)[1], 0.0);
  logits[0] = -INFINITY;
  EXPECT_THROW(ref::softmax(logits), Error);
  logits[0] = NAN;
  try {
    ref::softmax(logits);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kBadNumber);
  }
}

TEST(Attention, CausalRowsAttendToTheirPrefixAndColumnSumsCountQueries) {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> g;  // fine here: only self-consistency is checked
  const int T = 13, d = 6;
  MatX Q(T, d), K(T, d), V(T, d);
  for (auto* m : {&Q, &K, &V})
    for (Eigen::Index i = 0; i < m->size(); ++i) m->data()[i] = g(rng);
  const MatX O = ref::causal_attention(Q, K, V);
  for (int t = 0; t < T; ++t)
    EXPECT_LT((O.row(t).transpose() - naive_attention(Q.row(t).transpose(), K.topRows(t + 1), V.topRows(t + 1))).norm(),
              1e-12);
  const VecX colsum = ref::causal_attention_colsum(Q, K);
  EXPECT_NEAR(colsum.sum(), T, 1e-9);
  EXPECT_NEAR(colsum[T - 1], ref::softmax((K * Q.row(T - 1).transpose()) / std::sqrt(double(d)))[T - 1], 1e-12);
}

TEST(Attention, GqaGroupsAreContiguous) {
  EXPECT_EQ(ref::kv_head_of(0, 8, 2), 0);
  EXPECT_EQ(ref::kv_head_of(3, 8, 2), 0);
  EXPECT_EQ(ref::kv_head_of(4, 8, 2), 1);
  EXPECT_EQ(ref::kv_head_of(7, 8, 8), 7);
  EXPECT_EQ(ref::kv_head_of(7, 8, 1), 0);
}

RC_GTEST_PROP(Rope, RotationsComposeAndPreserveNorms, ()) {
  const auto half = *rc::gen::inRange<std::int64_t>(1, 9);
  const VecX x = *grid_vector(2 * half);
  const double a = *rc::gen::inRange(-500, 500), b = *rc::gen::inRange(-500, 500);
  const VecX ab = ref::rope_rotate(ref::rope_rotate(x, a, 10000.0), b, 10000.0);
  RC_ASSERT((ab - ref::rope_rotate(x, a + b, 10000.0)).norm() < 1e-9 * (1 + x.norm()));
  RC_ASSERT(std::abs(ref::rope_rotate(x, a, 10000.0).norm() - x.norm()) < 1e-9 * (1 + x.norm()));
}

RC_GTEST_PROP(Rope, LogitsDependOnlyOnRelativePosition, ()) {
  const VecX q = *grid_vector(8), k = *grid_vector(8);
  const double pq = *rc::gen::inRange(0, 300), pk = *rc::gen::inRange(0, 300), shift = *rc::gen::inRange(0, 300);
  const double l1 = ref::rope_rotate(q, pq, 500.0).dot(ref::rope_rotate(k, pk, 500.0));
  const double l2 = ref::rope_rotate(q, pq + shift, 500.0).dot(ref::rope_rotate(k, pk + shift, 500.0));
  RC_ASSERT(std::abs(l1 - l2) < 1e-9 * (1 + q.norm() * k.norm()));
}

TEST(Rope, ZeroRotationIsExactlyTheIdentity) {
  VecX x(4);
  x << 0.1, -3.7, 1e-30, 5.5;
  EXPECT_EQ(ref::rope_rotate(x, 0.0, 10000.0), x);
}
