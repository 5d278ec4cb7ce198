// Shared scoring machinery: window scores against the causal attention rows,
// accumulated attention, PyTorch pooling edges, GQA reduction, top-k ties.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <cmath>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/scores.hpp"
#include "kvscope_layer.hpp"

using namespace kvscope;
using ref::MatX;
using ref::VecX;

namespace {

VecX vec(std::initializer_list<double> v) {
  VecX x(static_cast<Eigen::Index>(v.size()));
  Eigen::Index i = 0;
  for (double e : v) x[i++] = e;
  return x;
}

}  // namespace

TEST(WindowScores, RowsAreTheLastRowsOfCausalAttention) {
  const auto f = tests::random_layer(1, 1, 12, 8, 3);
  const MatX A = ref::window_attention(f.input.q[0], f.input.k[0], 4);
  ASSERT_EQ(A.rows(), 4);
  // Causal attention with V = I returns the attention matrix itself.
  const MatX full = ref::causal_attention(f.input.q[0], f.input.k[0], MatX::Identity(12, 12));
  EXPECT_LT((A - full.bottomRows(4)).cwiseAbs().maxCoeff(), 1e-14);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(A.row(i).sum(), 1.0, 1e-14);
  EXPECT_EQ(A(0, 11), 0.0);  // query 8 cannot see key 11
  const VecX sum = ref::window_scores(f.input.q[0], f.input.k[0], 4, ref::Reduce::kSum);
  const VecX mean = ref::window_scores(f.input.q[0], f.input.k[0], 4, ref::Reduce::kMean);
  EXPECT_NEAR(sum.sum(), 4.0, 1e-12);
  EXPECT_LT((sum / 4.0 - mean).cwiseAbs().maxCoeff(), 1e-15);
  // A window longer than the prompt is the whole prompt.
  EXPECT_EQ(ref::window_attention(f.input.q[0], f.input.k[0], 50).rows(), 12);
}

TEST(AccumulatedAttention, ComputedMatchesRecordedAndSumsToQueryCount) {
  auto f = tests::random_layer(2, 1, 10, 8, 5);
  const VecX computed = ref::accumulated_attention(f.input, 1, false);
  EXPECT_NEAR(computed.sum(), 10.0, 1e-12);  // every causal row sums to 1
  const VecX per_query = ref::accumulated_attention(f.input, 1, true);
  EXPECT_NEAR(per_query[9] * 1.0, computed[9], 1e-15);  // only the last query sees the last key
  EXPECT_NEAR(per_query[0] * 10.0, computed[0], 1e-12);
  f.input.attn_colsum = {VecX::Constant(10, 7.0), VecX::Constant(10, 3.0)};
  EXPECT_EQ(ref::accumulated_attention(f.input, 1, false)[4], 3.0);  // the recorded one wins
}

TEST(Pool1d, AvgCountsPaddingLikeTorch) {
  const VecX x = vec({1, 2, 3, 4});
  // torch.nn.functional.avg_pool1d(x, 3, stride=1, padding=1) = [1, 2, 3, 7/3]
  const VecX y = ref::pool1d(x, 3, ref::Pool::kAvg);
  EXPECT_DOUBLE_EQ(y[0], 1.0);
  EXPECT_DOUBLE_EQ(y[1], 2.0);
  EXPECT_DOUBLE_EQ(y[3], 7.0 / 3.0);
  // Kernel longer than the input: every output divides the whole sum by 7.
  const VecX z = ref::pool1d(x, 7, ref::Pool::kAvg);
  EXPECT_DOUBLE_EQ(z[0], 10.0 / 7.0);
  EXPECT_DOUBLE_EQ(z[3], 10.0 / 7.0);
  EXPECT_EQ(ref::pool1d(x, 1, ref::Pool::kAvg), x);
  EXPECT_EQ(ref::pool1d(x, 5, ref::Pool::kNone), x);
}

TEST(Pool1d, MaxIgnoresPadding) {
  const VecX y = ref::pool1d(vec({-5, -1, -3, -4}), 3, ref::Pool::kMax);
  EXPECT_EQ(y, vec({-1, -1, -1, -3}));
}

TEST(Pool1d, EvenKernelIsAUsageError) {
  try {
    ref::pool1d(vec({1, 2}), 4, ref::Pool::kAvg);
    FAIL() << "accepted an even kernel";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUsage);
  }
}

RC_GTEST_PROP(Pool1d, AvgIsLinearAndMaxDominatesTheInput, ()) {
  const auto n = *rc::gen::inRange<int>(1, 20);
  const auto k = 2 * *rc::gen::inRange<int>(0, 6) + 1;
  const auto xs = *rc::gen::container<std::vector<int>>(static_cast<std::size_t>(n), rc::gen::inRange(-50, 50));
  VecX x(n);
  for (int i = 0; i < n; ++i) x[i] = xs[static_cast<std::size_t>(i)];
  RC_ASSERT(((ref::pool1d(2.0 * x, k, ref::Pool::kAvg) - 2.0 * ref::pool1d(x, k, ref::Pool::kAvg)).cwiseAbs().maxCoeff()) <
            1e-12);
  const VecX m = ref::pool1d(x, k, ref::Pool::kMax);
  for (int i = 0; i < n; ++i) RC_ASSERT(m[i] >= x[i]);
}

TEST(GroupReduce, MeanMaxSumOverTheGroup) {
  const std::vector<VecX> s = {vec({1, 0}), vec({3, 4}), vec({10, 10}), vec({0, 0})};
  EXPECT_EQ(ref::group_reduce(s, 0, 4, 2, ref::Reduce::kMean), vec({2, 2}));
  EXPECT_EQ(ref::group_reduce(s, 0, 4, 2, ref::Reduce::kMax), vec({3, 4}));
  EXPECT_EQ(ref::group_reduce(s, 1, 4, 2, ref::Reduce::kSum), vec({10, 10}));
}

TEST(TopK, TiesKeepTheLowerIndexAndAreReported) {
  const VecX s = vec({5, 1, 3, 3, 3, 0});
  const ref::Selection sel = ref::top_k(s, ref::index_range(0, 6), 3);
  EXPECT_EQ(sel.kept, (std::vector<std::int64_t>{0, 2, 3}));
  EXPECT_EQ(sel.margin, 0.0);
  EXPECT_EQ(sel.ties, 1);  // token 4 ties with the last kept score
  const ref::Selection clear = ref::top_k(s, ref::index_range(0, 6), 1);
  EXPECT_EQ(clear.margin, 2.0);
  EXPECT_EQ(clear.ties, 0);
  EXPECT_EQ(ref::top_k(s, ref::index_range(0, 6), 9).kept.size(), 6u);  // clamped
  EXPECT_TRUE(std::isinf(ref::top_k(s, ref::index_range(0, 6), 0).margin));
}

TEST(TopK, NaNScoreIsABadNumber) {
  const VecX s = vec({1, std::nan(""), 2});
  try {
    ref::top_k(s, ref::index_range(0, 3), 1);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kBadNumber);
    EXPECT_NE(std::string(e.what()).find("token 1"), std::string::npos);
  }
}

RC_GTEST_PROP(TopK, KeptScoresDominateEvictedOnes, ()) {
  const auto xs = *rc::gen::nonEmpty(rc::gen::container<std::vector<int>>(rc::gen::inRange(-3, 4)));
  const auto n = static_cast<std::int64_t>(xs.size());
  const auto k = *rc::gen::inRange<std::int64_t>(0, n + 2);
  VecX s(n);
  for (std::int64_t i = 0; i < n; ++i) s[i] = xs[static_cast<std::size_t>(i)];
  const ref::Selection sel = ref::top_k(s, ref::index_range(0, n), k);
  RC_ASSERT(static_cast<std::int64_t>(sel.kept.size()) == std::min(k, n));
  std::vector<char> kept(static_cast<std::size_t>(n), 0);
  for (auto j : sel.kept) kept[static_cast<std::size_t>(j)] = 1;
  double min_kept = INFINITY, max_evicted = -INFINITY;
  for (std::int64_t j = 0; j < n; ++j) (kept[static_cast<std::size_t>(j)] ? min_kept : max_evicted) =
      kept[static_cast<std::size_t>(j)] ? std::min(min_kept, s[j]) : std::max(max_evicted, s[j]);
  RC_ASSERT(min_kept >= max_evicted);
  if (!sel.kept.empty() && static_cast<std::int64_t>(sel.kept.size()) < n) RC_ASSERT(sel.margin == min_kept - max_evicted);
}
