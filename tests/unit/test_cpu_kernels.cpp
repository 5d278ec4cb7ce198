// Every CPU kernel against its reference counterpart, in every storage dtype,
// on fixed-seed random inputs (the inputs are representable in the dtype, so
// the reference sees exactly what the kernel reads: differences are fp32
// compute only). Tolerances come from core/tolerance.hpp.
#include <gtest/gtest.h>
#include <omp.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <utility>

#include "kvscope/core/tolerance.hpp"
#include "kvscope/opt/cpu/evict_merge.hpp"
#include "kvscope/opt/cpu/merging.hpp"
#include "kvscope/opt/cpu/ragged.hpp"
#include "kvscope/opt/cpu/scores.hpp"
#include "kvscope/opt/cpu/select.hpp"
#include "kvscope/opt/layer_storage.hpp"
#include "kvscope/opt/ragged_cache.hpp"
#include "kvscope/reference/methods/ems.hpp"
#include "kvscope/reference/methods/kvmerger.hpp"
#include "kvscope/reference/plan_apply.hpp"
#include "kvscope/reference/scores.hpp"

using namespace kvscope;
using ref::MatX;
using ref::VecX;

namespace {

constexpr DType kDtypes[] = {DType::kF32, DType::kF16, DType::kBF16};

/// run() on 1 and on 3 OpenMP threads (the thread count restored after).
template <class F>
std::pair<std::vector<float>, std::vector<float>> on_1_and_3_threads(F&& run) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  std::vector<float> one = run();
  omp_set_num_threads(3);
  std::vector<float> three = run();
  omp_set_num_threads(saved);
  return {std::move(one), std::move(three)};
}

/// Same size and the same bits.
void expect_same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
}

/// A [heads, T, d] tensor of standard normals rounded to `t`, its storage, and per-head double views.
struct Heads {
  Tensor tensor;
  opt::StorageBuffer storage;
  std::vector<MatX> mats;
};

Heads random_heads(int heads, std::int64_t T, int d, DType t, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  Heads h{Tensor({heads, T, d}), {}, {}};
  for (float& x : h.tensor.data) x = round_to_dtype(g(rng), t);
  h.storage = opt::pack(h.tensor, t);
  for (int i = 0; i < heads; ++i) {
    MatX m(T, d);
    for (std::int64_t r = 0; r < T; ++r)
      for (int c = 0; c < d; ++c) m(r, c) = h.tensor.row(i, r)[static_cast<std::size_t>(c)];
    h.mats.push_back(std::move(m));
  }
  return h;
}

double max_rel_diff(const float* got, const VecX& want) {
  const double scale = std::max(want.cwiseAbs().maxCoeff(), 1e-30);
  double worst = 0;
  for (Eigen::Index i = 0; i < want.size(); ++i) worst = std::max(worst, std::abs(got[i] - want[i]) / scale);
  return worst;
}

template <class F>
void with_storage(const opt::StorageBuffer& b, F&& f) {
  opt::cpu::dispatch_storage(b.dtype(), [&](auto tag) { f(b.data<decltype(tag)>()); });
}

constexpr double kScoreTol = 2e-5;  // fp32 softmax sums against double, relative to the largest score

// Every path of the window's logits: the GEMM tile (3 x 8 rows per group),
// four rows by two keys converted in registers (groups of 4, windows 1 and 2,
// an odd key count so one key is left over), two rows by four keys (groups of
// 3), and a head dim that is not a multiple of eight.
TEST(CpuKernels, WindowScoresMatchReferenceWithGqa) {
  struct Case {
    int group, d;
    std::int64_t window;
  };
  const std::int64_t T = 37;
  for (const Case c : {Case{3, 16, 8}, Case{4, 16, 1}, Case{4, 16, 2}, Case{3, 16, 2}, Case{4, 12, 1}})
    for (DType t : kDtypes)
      for (auto rows : {opt::cpu::Reduce::kSum, opt::cpu::Reduce::kMean, opt::cpu::Reduce::kMax}) {
        const int hq = 2 * c.group;
        const opt::cpu::LayerShape s{hq, 2, c.d, T};
        const Heads q = random_heads(hq, T, c.d, t, 1), k = random_heads(2, T, c.d, t, 2);
        std::vector<float> out(static_cast<std::size_t>(hq * T), -1.0f);
        with_storage(q.storage, [&](const auto* qp) {
          using S = std::remove_cv_t<std::remove_pointer_t<decltype(qp)>>;
          opt::cpu::window_scores(s, qp, k.storage.data<S>(), c.window, rows, out.data());
        });
        const ref::Reduce rr = rows == opt::cpu::Reduce::kSum ? ref::Reduce::kSum
                               : rows == opt::cpu::Reduce::kMean ? ref::Reduce::kMean : ref::Reduce::kMax;
        for (int h = 0; h < hq; ++h) {
          const VecX want = ref::window_scores(q.mats[static_cast<std::size_t>(h)],
                                               k.mats[static_cast<std::size_t>(h / c.group)], c.window, rr);
          EXPECT_LT(max_rel_diff(out.data() + h * T, want), kScoreTol)
              << dtype_name(t) << " group " << c.group << " d " << c.d << " window " << c.window << " q head " << h;
        }
      }
}

TEST(CpuKernels, WindowLongerThanPromptIsClamped) {
  const opt::cpu::LayerShape s{1, 1, 4, 5};
  const Heads q = random_heads(1, 5, 4, DType::kF32, 3), k = random_heads(1, 5, 4, DType::kF32, 4);
  std::vector<float> out(5);
  opt::cpu::window_scores(s, q.storage.data<float>(), k.storage.data<float>(), 64, opt::cpu::Reduce::kSum, out.data());
  EXPECT_LT(max_rel_diff(out.data(), ref::window_scores(q.mats[0], k.mats[0], 64, ref::Reduce::kSum)), kScoreTol);
  double total = 0;
  for (float x : out) total += x;
  EXPECT_NEAR(total, 5.0, 1e-5);  // five softmax rows, each summing to one
}

TEST(CpuKernels, AccumulatedAttentionMatchesCausalColumnSums) {
  for (DType t : kDtypes)
    for (bool per_query : {false, true}) {
      const opt::cpu::LayerShape s{4, 2, 8, 29};
      const Heads q = random_heads(4, 29, 8, t, 5), k = random_heads(2, 29, 8, t, 6);
      std::vector<float> out(4 * 29);
      with_storage(q.storage, [&](const auto* qp) {
        using S = std::remove_cv_t<std::remove_pointer_t<decltype(qp)>>;
        opt::cpu::accumulated_attention(s, qp, k.storage.data<S>(), per_query, out.data());
      });
      for (int h = 0; h < 4; ++h) {
        VecX want = ref::causal_attention_colsum(q.mats[static_cast<std::size_t>(h)], k.mats[static_cast<std::size_t>(h / 2)]);
        if (per_query)
          for (Eigen::Index j = 0; j < want.size(); ++j) want[j] /= static_cast<double>(29 - j);
        EXPECT_LT(max_rel_diff(out.data() + h * 29, want), kScoreTol) << dtype_name(t) << " q head " << h;
      }
    }
}

TEST(CpuKernels, KeyNormsAndAdjacentCosines) {
  for (DType t : kDtypes) {
    const opt::cpu::LayerShape s{2, 2, 16, 21};
    Heads k = random_heads(2, 21, 16, t, 7);
    // Two zero keys in a row (cosine 1 by contract) and one zero next to a non-zero key (0).
    for (std::int64_t r : {3, 4})
      for (int c = 0; c < 16; ++c) k.storage.set((1 * 21 + r) * 16 + c, 0.0f), k.mats[1](r, c) = 0.0;
    std::vector<float> norms(2 * 21), cos(2 * 20);
    with_storage(k.storage, [&](const auto* kp) {
      opt::cpu::key_norm_scores(s, kp, norms.data());
      opt::cpu::adjacent_key_cosine(s, kp, cos.data());
    });
    for (int h = 0; h < 2; ++h) {
      const MatX& K = k.mats[static_cast<std::size_t>(h)];
      EXPECT_LT(max_rel_diff(norms.data() + h * 21, -K.rowwise().norm()), 1e-6) << dtype_name(t);
      VecX want(20);
      for (int j = 0; j < 20; ++j) want[j] = ref::key_cosine(K.row(j).transpose(), K.row(j + 1).transpose());
      EXPECT_LT(max_rel_diff(cos.data() + h * 20, want), 1e-6) << dtype_name(t);
    }
    EXPECT_EQ(cos[20 + 3], 1.0f);
    EXPECT_EQ(cos[20 + 2], 0.0f);
  }
}

// key_norm_scores takes rows eight at a time (d % 32 == 0: four chains a row,
// in zmm under AVX-512; other multiples of eight: eight FMA chains, one
// hsum8) and the rest one by one: a row's norm must not depend on which path
// it takes. Each row of a 21-row head (two blocks of eight, then five) is
// compared with the same row scored alone (always the one-row path). A zero
// row scores -0.
TEST(CpuKernels, KeyNormsOfBlockedRowsAreTheSameBitsAsOfRowsAlone) {
  const std::int64_t T = 21;
  for (int d : {16, 32, 128, 12})
    for (DType t : kDtypes) {
      Heads k = random_heads(1, T, d, t, 61);
      for (int c = 0; c < d; ++c) k.tensor.row(0, 4)[static_cast<std::size_t>(c)] = 0.0f;
      const opt::StorageBuffer all = opt::pack(k.tensor, t);
      std::vector<float> norms(T);
      with_storage(all, [&](const auto* kp) { opt::cpu::key_norm_scores({1, 1, d, T}, kp, norms.data()); });
      for (std::int64_t r = 0; r < T; ++r) {
        Tensor row({1, 1, d});
        std::copy_n(k.tensor.row(0, r).begin(), d, row.data.begin());
        float alone = 0.0f;
        with_storage(opt::pack(row, t), [&](const auto* kp) { opt::cpu::key_norm_scores({1, 1, d, 1}, kp, &alone); });
        EXPECT_EQ(std::bit_cast<std::uint32_t>(norms[r]), std::bit_cast<std::uint32_t>(alone))
            << dtype_name(t) << " d " << d << " row " << r;
      }
      EXPECT_EQ(std::bit_cast<std::uint32_t>(norms[4]), std::bit_cast<std::uint32_t>(-0.0f)) << dtype_name(t);
      EXPECT_NEAR(norms[5], -k.mats[0].row(5).norm(), 1e-5 * k.mats[0].row(5).norm()) << dtype_name(t);
    }
}

// The cosine is scale-free: a key times 2^k (exact) gives the same bits. Each
// row is brought to [1/2, 1) by a power of two unless that cannot change a
// bit; the crafted pair below cancels to one tiny product, where rounding in
// the subnormal range would tell a skipped scale from a taken one.
TEST(CpuKernels, AdjacentCosinesAreTheSameBitsForKeysScaledByPowersOfTwo) {
  const int d = 128;
  const std::int64_t T = 40;
  for (DType t : {DType::kF32, DType::kBF16}) {
    Heads k = random_heads(1, T, d, t, 51);
    // Rows 10, 11: elements 0 and 32 share one FMA lane chain and cancel
    // (1 * 1 + 1 * -1), then element 64 adds (1.5 * 2^-75)^2, below fp32's
    // normal range. Row 20: unit-sized with one tiny entry.
    for (std::int64_t r : {10, 11, 20})
      for (int c = 0; c < d; ++c) k.storage.set(r * d + c, 0.0f);
    k.storage.set(10 * d + 0, 1.0f), k.storage.set(10 * d + 32, 1.0f), k.storage.set(10 * d + 64, 0x1.8p-75f);
    k.storage.set(11 * d + 0, 1.0f), k.storage.set(11 * d + 32, -1.0f), k.storage.set(11 * d + 64, 0x1.8p-75f);
    for (int c = 0; c < d; ++c) k.storage.set(20 * d + c, c % 3 == 0 ? 0.75f : -0.5f);
    k.storage.set(20 * d + 5, 0x1p-70f);
    const opt::cpu::LayerShape s{1, 1, d, T};
    std::vector<float> want(static_cast<std::size_t>(T - 1));
    with_storage(k.storage, [&](const auto* kp) { opt::cpu::adjacent_key_cosine(s, kp, want.data()); });
    for (int p : {-20, 3, 20}) {
      opt::StorageBuffer scaled(t, T * d);
      for (std::int64_t i = 0; i < T * d; ++i) scaled.set(i, std::ldexp(k.storage.get(i), p));
      std::vector<float> got(want.size());
      with_storage(scaled, [&](const auto* kp) { opt::cpu::adjacent_key_cosine(s, kp, got.data()); });
      SCOPED_TRACE(std::string(dtype_name(t)) + " keys times 2^" + std::to_string(p));
      expect_same_bits(got, want);
    }
  }
}

// Where AVX-512 is built for, a row used as stored stays in registers as the
// next pair's first row (d = 32, 64, 128); from a row that needs its scale on,
// the item's pairs go through fp32 buffers. Both must give the same bits: row
// 1 below gets one tiny entry (so it needs its scale), which sends pairs 1..
// through the buffers, and pairs 2.. (whose rows are unchanged) must equal
// those of the untouched head. bf16 and fp32 only: fp16 never needs a scale.
TEST(CpuKernels, AdjacentCosinesInRegistersAreTheSameBitsAsThroughBuffers) {
  const std::int64_t T = 40;
  for (int d : {32, 64, 128, 96})
    for (DType t : {DType::kF32, DType::kBF16}) {
      Heads k = random_heads(1, T, d, t, 71);
      const opt::cpu::LayerShape s{1, 1, d, T};
      std::vector<float> want(static_cast<std::size_t>(T - 1)), got(want.size());
      with_storage(k.storage, [&](const auto* kp) { opt::cpu::adjacent_key_cosine(s, kp, want.data()); });
      k.storage.set(1 * d + 3, 0x1p-90f);
      with_storage(k.storage, [&](const auto* kp) { opt::cpu::adjacent_key_cosine(s, kp, got.data()); });
      SCOPED_TRACE(std::string(dtype_name(t)) + " d " + std::to_string(d));
      EXPECT_NE(got[0], want[0]);  // the changed row's pairs moved
      expect_same_bits(std::vector<float>(got.begin() + 2, got.end()), std::vector<float>(want.begin() + 2, want.end()));
    }
}

TEST(CpuKernels, PoolingFollowsTorchEdgesIncludingKernelLongerThanInput) {
  std::mt19937_64 rng(8);
  std::normal_distribution<double> g;
  for (std::int64_t n : {1, 2, 5, 13, 200, 1001})  // long rows: the vectorised interior
    for (std::int64_t kernel : {1, 3, 5, 7, 31})
      for (auto pool : {opt::cpu::Pool::kNone, opt::cpu::Pool::kAvg, opt::cpu::Pool::kMax}) {
        VecX x(n);
        std::vector<float> xf(static_cast<std::size_t>(n)), y(static_cast<std::size_t>(n));
        for (std::int64_t i = 0; i < n; ++i) xf[static_cast<std::size_t>(i)] = static_cast<float>(g(rng)), x[i] = xf[static_cast<std::size_t>(i)];
        opt::cpu::pool1d(xf.data(), n, kernel, pool, y.data());
        const ref::Pool rp = pool == opt::cpu::Pool::kNone ? ref::Pool::kNone
                             : pool == opt::cpu::Pool::kAvg ? ref::Pool::kAvg : ref::Pool::kMax;
        EXPECT_LT(max_rel_diff(y.data(), ref::pool1d(x, kernel, rp)), 1e-6) << "n " << n << " kernel " << kernel;
      }
}

TEST(CpuKernels, GroupReduceMatchesReference) {
  std::vector<VecX> per_q;
  std::vector<float> in;
  std::mt19937_64 rng(9);
  std::normal_distribution<float> g;
  for (int h = 0; h < 6; ++h) {
    VecX v(11);
    for (int j = 0; j < 11; ++j) in.push_back(g(rng)), v[j] = in.back();
    per_q.push_back(v);
  }
  for (auto r : {ref::Reduce::kSum, ref::Reduce::kMean, ref::Reduce::kMax}) {
    std::vector<float> out(2 * 11);
    const auto cr = r == ref::Reduce::kSum ? opt::cpu::Reduce::kSum : r == ref::Reduce::kMean ? opt::cpu::Reduce::kMean : opt::cpu::Reduce::kMax;
    opt::cpu::group_reduce(in.data(), 6, 2, 11, cr, out.data());
    for (int kv = 0; kv < 2; ++kv) EXPECT_LT(max_rel_diff(out.data() + kv * 11, ref::group_reduce(per_q, kv, 6, 2, r)), 1e-6);
  }
}

TEST(CpuKernels, TopKEqualsReferenceIncludingTies) {
  std::mt19937_64 rng(10);
  for (int trial = 0; trial < 200; ++trial) {
    const std::int64_t n = 1 + static_cast<std::int64_t>(rng() % 40);
    std::vector<float> s(static_cast<std::size_t>(n));
    VecX sd(n);
    for (std::int64_t j = 0; j < n; ++j) s[static_cast<std::size_t>(j)] = static_cast<float>(rng() % 4), sd[j] = s[static_cast<std::size_t>(j)];  // many exact ties
    std::vector<std::int64_t> cand;
    for (std::int64_t j = 0; j < n; ++j)
      if (rng() % 4 != 0) cand.push_back(j);
    const std::int64_t k = static_cast<std::int64_t>(rng() % (cand.size() + 2));
    std::vector<std::int64_t> kept;
    opt::cpu::top_k(s.data(), cand, k, kept);
    EXPECT_EQ(kept, ref::top_k(sd, cand, k).kept) << "trial " << trial;
  }
}

TEST(CpuKernels, TopKOfThousandsOfClusteredTiedAndOutlyingScoresEqualsReference) {
  // Above the histogram threshold: scores bunched in a narrow range (key
  // norms), exact ties, infinities and denormals that stretch the range, and
  // budgets at both edges; candidates increasing (the 32-bit key path) or in
  // a range.
  std::mt19937_64 rng(45);
  std::normal_distribution<float> noise(0.0f, 1e-3f);
  for (int trial = 0; trial < 60; ++trial) {
    const std::int64_t n = 256 + static_cast<std::int64_t>(rng() % 5000);
    std::vector<float> s(static_cast<std::size_t>(n));
    VecX sd(n);
    for (std::int64_t j = 0; j < n; ++j) {
      float v = trial % 3 == 0 ? -11.3f + noise(rng) : trial % 3 == 1 ? static_cast<float>(rng() % 7) : std::ldexp(1.0f, -static_cast<int>(rng() % 140));
      if (rng() % 500 == 0) v = rng() % 2 ? INFINITY : -INFINITY;
      s[static_cast<std::size_t>(j)] = v, sd[j] = v;
    }
    // Every fourth trial's candidates are one range (the scores are read
    // without a gather); the others skip one token in eight.
    std::vector<std::int64_t> cand;
    const std::int64_t skip_front = static_cast<std::int64_t>(rng() % 9);
    for (std::int64_t j = 0; j < n; ++j)
      if (trial % 4 == 3 ? j >= skip_front : rng() % 8 != 0) cand.push_back(j);
    const auto nc = static_cast<std::int64_t>(cand.size());
    const std::int64_t ks[] = {0, 1, nc / 2, nc - 1, nc, static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(nc))};
    for (std::int64_t k : ks) {
      std::vector<std::int64_t> kept;
      opt::cpu::top_k(s.data(), cand, k, kept);
      EXPECT_EQ(kept, ref::top_k(sd, cand, k).kept) << "trial " << trial << ", n " << n << ", k " << k;
    }
  }
}

TEST(CpuKernels, TopKOfLongRowsEqualsReferenceWhetherTheSampledBandHoldsTheKthOrNot) {
  // Rows long enough for the sampled band (AVX-512 builds): continuous
  // scores, where the band holds the k-th key; clustered and heavily tied
  // ones; and rows whose sampled positions (a fixed stride) carry the best
  // scores, so the sample misjudges the quantile and every key is counted.
  // Candidates are one range (keys made in the band pass) or skip tokens.
  std::mt19937_64 rng(46);
  std::exponential_distribution<float> attention(1.0f);
  std::normal_distribution<float> norm(-11.3f, 1e-3f);
  for (int trial = 0; trial < 24; ++trial) {
    const std::int64_t n = 4096 + static_cast<std::int64_t>(rng() % 12000);
    const int kind = trial % 4;
    std::vector<float> s(static_cast<std::size_t>(n));
    for (float& x : s)
      x = kind == 0 ? attention(rng) : kind == 1 ? norm(rng) : kind == 2 ? static_cast<float>(rng() % 7) : attention(rng);
    std::vector<std::int64_t> cand;
    for (std::int64_t j = 0; j < n; ++j)
      if (trial % 3 != 0 || rng() % 8 != 0) cand.push_back(j);
    if (kind == 3) {  // the best scores on every sampled candidate position, at strides near n / 1024
      const std::size_t stride = cand.size() / 1024;
      for (std::size_t q = 0; q < 1024; ++q) s[static_cast<std::size_t>(cand[q * stride + stride / 2])] = 100.0f + static_cast<float>(q);
    }
    VecX sd(n);
    for (std::int64_t j = 0; j < n; ++j) sd[j] = s[static_cast<std::size_t>(j)];
    const auto nc = static_cast<std::int64_t>(cand.size());
    const std::int64_t ks[] = {1, 7, nc / 3, nc / 2, nc - 3, static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(nc))};
    for (std::int64_t k : ks) {
      std::vector<std::int64_t> kept;
      opt::cpu::top_k(s.data(), opt::cpu::Candidates(cand), k, kept);
      EXPECT_EQ(kept, ref::top_k(sd, cand, k).kept) << "seed 46, trial " << trial << ", n " << n << ", k " << k;
    }
  }
}

/// A random plan over T tokens: one-hot, merged (weights), value-only and re-rotated rows.
Plan random_plan(std::int64_t T, std::mt19937_64& rng, bool rerotated) {
  Plan p;
  p.n = T;
  p.positions = rerotated ? PositionMode::kRerotated : PositionMode::kOriginal;
  std::uniform_real_distribution<double> w(0.1, 1.0);
  for (std::int64_t slot = 0; slot < T / 2; ++slot) {
    const std::int64_t j = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(T));
    if (rerotated || rng() % 3 == 0) {
      const std::int64_t tok[] = {j};
      const double one[] = {1.0};
      p.add_row(tok, one, one, rerotated ? slot : j, 1);
    } else {
      const std::int64_t a = std::min(j, T - 2), tok[] = {a, a + 1};
      const double ck[] = {w(rng), rng() % 2 ? 0.0 : w(rng)}, cv[] = {w(rng), w(rng)};
      p.add_row(tok, ck, cv, a, 2);
    }
  }
  return p;
}

TEST(CpuKernels, RaggedPlanMatchesApplyPlanAndWritesEveryRow) {
  for (DType t : kDtypes)
    for (bool rerotated : {false, true}) {
      const int H = 3, d = 8;
      const std::int64_t T = 23;
      const Heads k = random_heads(H, T, d, t, 11), v = random_heads(H, T, d, t, 12);
      std::mt19937_64 rng(13);
      std::vector<Plan> plans;
      for (int h = 0; h < H; ++h) plans.push_back(random_plan(T, rng, rerotated));
      const opt::FlatPlans flat = opt::flatten(plans);
      const std::vector<std::int64_t>& offsets = flat.offsets;
      const opt::cpu::RaggedPlan rp = flat.view(10000.0);
      opt::StorageBuffer ko(t, offsets.back() * d), vo(t, offsets.back() * d);
      ko.poison();
      vo.poison();
      opt::cpu::dispatch_storage(t, [&](auto tag) {
        using S = decltype(tag);
        opt::cpu::apply_ragged_plan<S>(rp, k.storage.data<S>(), v.storage.data<S>(), T, d, ko.data<S>(), vo.data<S>());
      });
      const Tolerance tol = tolerance(t);
      for (int h = 0; h < H; ++h) {
        const ref::HeadCache c = ref::apply_plan(plans[static_cast<std::size_t>(h)], k.mats[static_cast<std::size_t>(h)],
                                                 v.mats[static_cast<std::size_t>(h)], 10000.0);
        for (std::int64_t r = 0; r < c.K.rows(); ++r)
          for (int i = 0; i < d; ++i) {
            const std::int64_t at = (offsets[static_cast<std::size_t>(h)] + r) * d + i;
            ASSERT_TRUE(std::isfinite(ko.get(at)) && std::isfinite(vo.get(at))) << "row left unwritten";
            EXPECT_NEAR(ko.get(at), c.K(r, i), tol.rel_l2 * (1 + std::abs(c.K(r, i)))) << dtype_name(t);
            EXPECT_NEAR(vo.get(at), c.V(r, i), tol.rel_l2 * (1 + std::abs(c.V(r, i)))) << dtype_name(t);
          }
      }
    }
}

// Groups of 2 (heads one by one), 4 (the four-head logits and V tiles) and 5
// (four heads, then one left over); head dims 16, 40 (tiles of 32 and 8) and
// 128; a key count per kv head that leaves a partial block and an odd key.
TEST(CpuKernels, DecodeAttentionMatchesReferenceWithAndWithoutLogCountBias) {
  for (int G : {2, 4, 5})
    for (int d : {16, 40, 128})
      for (DType t : kDtypes)
        for (bool bias : {false, true}) {
          const int Hkv = 2, Hq = G * Hkv;
          const std::int64_t offsets[] = {0, 9, 30};
          const Heads k = random_heads(1, 30, d, t, 14), v = random_heads(1, 30, d, t, 15),
                      q = random_heads(Hq, 1, d, DType::kF32, 16);
          std::vector<float> counts(30), log_bias(30);
          for (int r = 0; r < 30; ++r) counts[static_cast<std::size_t>(r)] = static_cast<float>(1 + r % 3), log_bias[static_cast<std::size_t>(r)] = std::log(counts[static_cast<std::size_t>(r)]);
          std::vector<float> out(static_cast<std::size_t>(Hq * d), NAN);
          opt::cpu::dispatch_storage(t, [&](auto tag) {
            using S = decltype(tag);
            opt::cpu::decode_attention<S>(q.tensor.data.data(), Hq, Hkv, d, offsets, k.storage.data<S>(),
                                          v.storage.data<S>(), bias ? log_bias.data() : nullptr, out.data());
          });
          for (int h = 0; h < Hq; ++h) {
            const int g = h / G;
            const std::int64_t first = offsets[g], n = offsets[g + 1] - first;
            VecX b(n);
            for (std::int64_t r = 0; r < n; ++r) b[r] = log_bias[static_cast<std::size_t>(first + r)];
            const VecX want = ref::attend(q.mats[static_cast<std::size_t>(h)].row(0).transpose(),
                                          k.mats[0].middleRows(first, n), v.mats[0].middleRows(first, n),
                                          bias ? &b : nullptr).output;
            EXPECT_LT(max_rel_diff(out.data() + h * d, want), 1e-5)
                << dtype_name(t) << " group " << G << " d " << d << " bias " << bias << " q head " << h;
          }
        }
}

TEST(CpuKernels, ResultsAreBitwiseIdenticalAcrossThreadCounts) {
  const opt::cpu::LayerShape s{8, 2, 32, 301};
  const Heads q = random_heads(8, 301, 32, DType::kF16, 17), k = random_heads(2, 301, 32, DType::kF16, 18);
  auto run = [&] {
    std::vector<float> w(8 * 301), a(8 * 301);
    opt::cpu::window_scores(s, q.storage.data<opt::cpu::f16>(), k.storage.data<opt::cpu::f16>(), 32, opt::cpu::Reduce::kSum, w.data());
    opt::cpu::accumulated_attention(s, q.storage.data<opt::cpu::f16>(), k.storage.data<opt::cpu::f16>(), false, a.data());
    w.insert(w.end(), a.begin(), a.end());
    return w;
  };
  const auto [one, three] = on_1_and_3_threads(run);
  expect_same_bits(one, three);
}

TEST(CpuKernels, AdjacentCosinesOfKeysNearUnderflowKeepTheirDirection) {
  // Squared norms of 1e-38-sized keys underflow in fp32; the kernel scales each key first.
  for (DType t : {DType::kF32, DType::kBF16}) {
    const opt::cpu::LayerShape s{1, 1, 8, 12};
    Heads k = random_heads(1, 12, 8, t, 21);
    for (std::int64_t r = 0; r < 12; ++r)
      for (int c = 0; c < 8; ++c) {
        const float x = round_to_dtype(k.tensor.row(0, r)[static_cast<std::size_t>(c)] * 1e-38f, t);
        k.storage.set(r * 8 + c, x);
        k.mats[0](r, c) = x;
      }
    std::vector<float> cos(11);
    with_storage(k.storage, [&](const auto* kp) { opt::cpu::adjacent_key_cosine(s, kp, cos.data()); });
    VecX want(11);
    for (int j = 0; j < 11; ++j) want[j] = ref::key_cosine(k.mats[0].row(j).transpose(), k.mats[0].row(j + 1).transpose());
    // Subnormal inputs carry fewer digits; the direction is still there (0/1 without scaling).
    EXPECT_LT(max_rel_diff(cos.data(), want), 1e-3) << dtype_name(t);
  }
}

TEST(CpuKernels, MergeRunsPickTheFirstBestPivot) {
  const std::vector<char> merge = {1, 1, 0, 0, 1, 0, 1, 1};  // runs {0,1,2} {3} {4,5} {6,7,8}
  const std::vector<float> score = {0.5f, 2.0f, 2.0f, 9.0f, 1.0f, 0.0f, 3.0f, 3.0f, 4.0f};
  std::vector<std::int64_t> begin, pivot;
  opt::cpu::merge_runs(9, merge.data(), score.data(), begin, pivot);
  EXPECT_EQ(begin, (std::vector<std::int64_t>{0, 3, 4, 6, 9}));
  EXPECT_EQ(pivot, (std::vector<std::int64_t>{1, 3, 4, 8}));
}

TEST(CpuKernels, GaussianMergeWeightsMatchKVMergerWeightsInEveryMode) {
  using Sigma = ref::KVMergerConfig::Sigma;
  const std::vector<std::int64_t> begin = {0, 5, 6, 9, 19, 23, 30};
  const std::vector<std::int64_t> pivot = {2, 5, 8, 9, 22, 26};
  for (DType t : kDtypes)
    for (Sigma mode : {Sigma::kMeanDistance, Sigma::kFixed, Sigma::kLiteral}) {
      Heads k = random_heads(1, 30, 16, t, 31);
      // A run of equal keys (every distance 0: uniform weights) and, where the
      // dtype holds them, a run of keys near fp32's underflow.
      for (std::int64_t r = 19; r < 23; ++r)
        for (int c = 0; c < 16; ++c) k.storage.set(r * 16 + c, k.storage.get(19 * 16 + c)), k.mats[0](r, c) = k.mats[0](19, c);
      if (t != DType::kF16)
        for (std::int64_t r = 23; r < 30; ++r)
          for (int c = 0; c < 16; ++c) {
            const float x = round_to_dtype(static_cast<float>(k.mats[0](r, c)) * 1e-37f, t);
            k.storage.set(r * 16 + c, x);
            k.mats[0](r, c) = x;
          }
      ref::KVMergerConfig c;
      c.sigma_mode = mode;
      c.sigma = 3.0;
      const auto cm = mode == Sigma::kFixed     ? opt::cpu::SigmaMode::kFixed
                      : mode == Sigma::kLiteral ? opt::cpu::SigmaMode::kLiteral
                                                : opt::cpu::SigmaMode::kMeanDistance;
      std::vector<float> w(30, std::nanf(""));
      with_storage(k.storage, [&](const auto* kp) {
        opt::cpu::gaussian_merge_weights(kp, 30, 16, begin.data(), pivot.data(), 6, cm, 3.0f, w.data());
      });
      for (std::size_t r = 0; r + 1 < begin.size(); ++r) {
        std::vector<std::int64_t> set;
        for (std::int64_t j = begin[r]; j < begin[r + 1]; ++j) set.push_back(j);
        const std::vector<double> want = ref::kvmerger_weights(k.mats[0], set, static_cast<std::size_t>(pivot[r] - begin[r]), c);
        for (std::size_t i = 0; i < set.size(); ++i)
          EXPECT_NEAR(w[static_cast<std::size_t>(set[i])], want[i], 1e-5)
              << dtype_name(t) << " mode " << static_cast<int>(mode) << " run " << r << " token " << set[i];
      }
    }
}

// With sigma the mean distance, the weights are scale-free: keys times 2^k
// (exact) give the same bits (the literal sigma is bounded by 1/sqrt 2 in
// absolute units, so it is not). Each run's distances
// are brought to one scale by a power of two, in one pass or two (the exact
// range shortcut); d = 128 and runs of 2..9 keys reach both row tiles.
TEST(CpuKernels, GaussianWeightsAreTheSameBitsForKeysScaledByPowersOfTwo) {
  const int d = 128;
  const std::int64_t T = 300;
  std::mt19937_64 rng(52);
  std::vector<std::int64_t> begin{0}, pivot;
  while (begin.back() < T) {
    const std::int64_t e = std::min(T, begin.back() + 1 + static_cast<std::int64_t>(rng() % 9));
    pivot.push_back(begin.back() + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(e - begin.back())));
    begin.push_back(e);
  }
  const auto runs = static_cast<std::int64_t>(pivot.size());
  const auto mode = opt::cpu::SigmaMode::kMeanDistance;
  for (DType t : {DType::kF32, DType::kBF16}) {
    Heads k = random_heads(1, T, d, t, 53);
    // Runs at other scales: one near 2^20, one near 2^-30 (both past the
    // one-pass range), the rest unit-sized.
    for (std::int64_t r = 0; r < T; ++r) {
      const int p = r < 40 ? 20 : r < 80 ? -30 : 0;
      for (int c = 0; c < d; ++c) k.storage.set(r * d + c, std::ldexp(k.storage.get(r * d + c), p));
    }
    std::vector<float> want(static_cast<std::size_t>(T));
    with_storage(k.storage, [&](const auto* kp) {
      opt::cpu::gaussian_merge_weights(kp, T, d, begin.data(), pivot.data(), runs, mode, 0.0f, want.data());
    });
    for (int p : {-20, 3, 20}) {
      opt::StorageBuffer scaled(t, T * d);
      for (std::int64_t i = 0; i < T * d; ++i) scaled.set(i, std::ldexp(k.storage.get(i), p));
      std::vector<float> got(want.size());
      with_storage(scaled, [&](const auto* kp) {
        opt::cpu::gaussian_merge_weights(kp, T, d, begin.data(), pivot.data(), runs, mode, 0.0f, got.data());
      });
      SCOPED_TRACE(std::string(dtype_name(t)) + " keys times 2^" + std::to_string(p));
      expect_same_bits(got, want);
    }
  }
}

// Where AVX-512 is built for, the weights of sixteen runs are computed at
// once, one run a lane. A run's weights must not depend on its neighbours:
// each run of a 300-token head (lengths 1..40) is compared bit for bit with
// the same run weighted alone, in every sigma mode and dtype.
TEST(CpuKernels, GaussianWeightsOfARunDoNotDependOnItsNeighbours) {
  const std::int64_t T = 300;
  std::mt19937_64 rng(54);
  std::vector<std::int64_t> begin{0}, pivot;
  while (begin.back() < T) {
    const std::int64_t len = rng() % 8 == 0 ? 1 + static_cast<std::int64_t>(rng() % 40) : 1 + static_cast<std::int64_t>(rng() % 3);
    const std::int64_t e = std::min(T, begin.back() + len);
    pivot.push_back(begin.back() + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(e - begin.back())));
    begin.push_back(e);
  }
  const auto runs = static_cast<std::int64_t>(pivot.size());
  for (int d : {16, 128})
    for (DType t : kDtypes)
      for (auto mode : {opt::cpu::SigmaMode::kMeanDistance, opt::cpu::SigmaMode::kFixed, opt::cpu::SigmaMode::kLiteral}) {
        const Heads k = random_heads(1, T, d, t, 55);
        std::vector<float> all(static_cast<std::size_t>(T));
        with_storage(k.storage, [&](const auto* kp) {
          opt::cpu::gaussian_merge_weights(kp, T, d, begin.data(), pivot.data(), runs, mode, 2.0f, all.data());
          for (std::int64_t r = 0; r < runs; ++r) {
            const std::int64_t b = begin[static_cast<std::size_t>(r)], m = begin[static_cast<std::size_t>(r) + 1] - b;
            const std::int64_t one_begin[2] = {0, m}, one_pivot[1] = {pivot[static_cast<std::size_t>(r)] - b};
            std::vector<float> alone(static_cast<std::size_t>(m));
            opt::cpu::gaussian_merge_weights(kp + b * d, m, d, one_begin, one_pivot, 1, mode, 2.0f, alone.data());
            SCOPED_TRACE(std::string(dtype_name(t)) + " d " + std::to_string(d) + " mode " +
                         std::to_string(static_cast<int>(mode)) + " run " + std::to_string(r));
            expect_same_bits(alone, std::vector<float>(all.begin() + b, all.begin() + b + m));
          }
        });
      }
}

TEST(CpuKernels, GroupBlockLogitsThenPrefixSoftmaxIsTheGroupsSoftmaxOverTheSlots) {
  const std::int64_t T = 40;
  const int d = 32, hq = 6, hkv = 2;
  // The block's logit columns: eleven keys, of which query 36 sees the
  // slots' seven; the other four (dropped earlier in the block) are set to
  // -inf in its rows, and the last column (a key after the prefix) is NaN.
  const std::vector<std::int64_t> columns = {0, 2, 3, 4, 9, 17, 20, 21, 25, 33, 38};
  const std::vector<std::int64_t> cols = {0, 2, 3, 5, 6, 7, 9};  // the slots' columns
  const auto nc = static_cast<std::int64_t>(columns.size()), m = static_cast<std::int64_t>(cols.size());
  const std::int64_t len = nc - 1;
  for (DType t : kDtypes)
    for (ref::Reduce r : {ref::Reduce::kMean, ref::Reduce::kSum, ref::Reduce::kMax}) {
      const Heads q = random_heads(hq, T, d, t, 41), k = random_heads(hkv, T, d, t, 42);
      const opt::cpu::LayerShape s{hq, hkv, d, T};
      const auto cr = r == ref::Reduce::kSum ? opt::cpu::Reduce::kSum : r == ref::Reduce::kMean ? opt::cpu::Reduce::kMean : opt::cpu::Reduce::kMax;
      for (int g = 0; g < hkv; ++g) {
        // Query 36 inside the block of prompt queries [32, 40).
        const std::int64_t t0 = 32, n = T - t0, u = 36 - t0;
        std::vector<float> block(static_cast<std::size_t>(3 * n * nc), std::nanf("")),
            out(static_cast<std::size_t>(len), std::nanf(""));
        opt::cpu::dispatch_storage(t, [&](auto tag) {
          using S = decltype(tag);
          opt::cpu::group_block_logits(s, q.storage.data<S>(), k.storage.data<S>(), columns.data(), nc, g, t0, n,
                                       block.data());
        });
        for (float x : block) ASSERT_FALSE(std::isnan(x)) << "block logits leave an entry unwritten";
        for (int h = 0; h < 3; ++h) {
          float* row = &block[static_cast<std::size_t>((h * n + u) * nc)];
          for (std::int64_t c = 0; c < len; ++c)
            if (std::find(cols.begin(), cols.end(), c) == cols.end()) row[c] = -INFINITY;
          row[len] = std::nanf("");  // outside the prefix: never read
        }
        opt::cpu::group_prefix_softmax(&block[static_cast<std::size_t>(u * nc)], n * nc, 3, len, cr, out.data());
        std::vector<float> got;
        for (std::int64_t c = 0; c < len; ++c) {
          const bool slot = std::find(cols.begin(), cols.end(), c) != cols.end();
          if (slot)
            got.push_back(out[static_cast<std::size_t>(c)]);
          else
            EXPECT_EQ(out[static_cast<std::size_t>(c)], 0.0f) << "masked column " << c;
        }
        std::vector<VecX> per_q;
        for (int h = 0; h < hq; ++h) {
          const MatX& K = k.mats[static_cast<std::size_t>(h / 3)];
          VecX logits(m);
          for (std::int64_t j = 0; j < m; ++j) {
            const std::int64_t key = columns[static_cast<std::size_t>(cols[static_cast<std::size_t>(j)])];
            logits[j] = q.mats[static_cast<std::size_t>(h)].row(36).dot(K.row(key)) / std::sqrt(double(d));
          }
          per_q.push_back(ref::softmax(logits));
        }
        EXPECT_LT(max_rel_diff(got.data(), ref::group_reduce(per_q, g, hq, hkv, r)), 1e-5) << dtype_name(t) << " kv " << g;
      }
    }
}

// A logit is a function of its query and key only, never of where they fall
// in the register tiles (rows by the dozen, keys by sixteen): the blocked
// kernels (window scores by key blocks, streaming prefills by query blocks)
// then agree with any other blocking bit for bit.
TEST(CpuKernels, GroupBlockLogitsDependOnlyOnTheirQueryAndKey) {
  const std::int64_t T = 53;
  for (int d : {128, 12}) {
    const int hq = 8, hkv = 2, G = 4;
    const Heads q = random_heads(hq, T, d, DType::kF16, 43), k = random_heads(hkv, T, d, DType::kF16, 44);
    const opt::cpu::LayerShape s{hq, hkv, d, T};
    const int g = 1;
    const opt::cpu::f16* qs = q.storage.data<opt::cpu::f16>();
    const opt::cpu::f16* ks = k.storage.data<opt::cpu::f16>();
    // All 41 queries [12, 53) against all 53 keys: 164 rows x 53 keys in tiles.
    const std::int64_t t0 = 12, n = T - t0;
    std::vector<std::int64_t> every(static_cast<std::size_t>(T));
    std::iota(every.begin(), every.end(), std::int64_t{0});
    std::vector<float> all(static_cast<std::size_t>(G * n * T));
    opt::cpu::group_block_logits(s, qs, ks, every.data(), T, g, t0, n, all.data());
    // Each query alone, against the keys from 7 on in reverse order (other
    // tiles, other tails, gathered rows).
    const std::int64_t first = 7, m = T - first;
    std::vector<std::int64_t> reversed(static_cast<std::size_t>(m));
    for (std::int64_t j = 0; j < m; ++j) reversed[static_cast<std::size_t>(j)] = T - 1 - j;
    std::vector<float> one(static_cast<std::size_t>(G * m));
    for (std::int64_t u = 0; u < n; ++u) {
      opt::cpu::group_block_logits(s, qs, ks, reversed.data(), m, g, t0 + u, 1, one.data());
      for (int i = 0; i < G; ++i)
        for (std::int64_t j = 0; j < m; ++j) {
          const float a = all[static_cast<std::size_t>((i * n + u) * T + T - 1 - j)];
          const float b = one[static_cast<std::size_t>(i * m + j)];
          ASSERT_EQ(std::memcmp(&a, &b, sizeof(float)), 0)
              << "d " << d << " q head " << i << " query " << t0 + u << " key " << T - 1 - j << ": " << a << " vs " << b;
        }
    }
  }
}

TEST(CpuKernels, CentreAssignmentMatchesEmsAssignWithZeroClassAndTinyRows) {
  const std::int64_t T = 48;
  const int d = 16;
  const std::vector<std::int64_t> centres = {2, 5, 11, 17, 30, 41}, rest = {40, 0, 7, 33, 12, 1, 25, 44, 9, 20, 3, 38};
  const std::vector<char> can_take = {1, 0, 1, 1, 1, 1};
  for (DType t : kDtypes)
    for (bool keys_only : {false, true}) {
      Heads k = random_heads(1, T, d, t, 51), v = random_heads(1, T, d, t, 52);
      for (int c = 0; c < d; ++c) {  // a zero key, a centre's copy, and (where the dtype holds it) a tiny key
        k.storage.set(7 * d + c, 0.0f), k.mats[0](7, c) = 0.0;
        k.storage.set(33 * d + c, k.storage.get(17 * d + c)), k.mats[0](33, c) = k.mats[0](17, c);
        v.storage.set(33 * d + c, v.storage.get(17 * d + c)), v.mats[0](33, c) = v.mats[0](17, c);
        if (t != DType::kF16) {
          const float x = round_to_dtype(static_cast<float>(k.mats[0](12, c)) * 1e-37f, t);
          k.storage.set(12 * d + c, x), k.mats[0](12, c) = x;
        }
      }
      ref::EmsConfig c;
      c.similarity = keys_only ? ref::EmsSimilarity::kKeys : ref::EmsSimilarity::kKeyValue;
      c.tau = 0.05;
      const ref::EmsAssignment want = ref::ems_assign(k.mats[0], v.mats[0], rest, centres, can_take, c);
      const auto R = rest.size();
      std::vector<float> best(R, std::nanf("")), second(R, std::nanf("")), any(R, std::nanf(""));
      std::vector<std::int64_t> centre(R, -7);
      opt::cpu::dispatch_storage(t, [&](auto tag) {
        using S = decltype(tag);
        opt::cpu::centre_assignment(k.storage.data<S>(), v.storage.data<S>(), d, rest.data(), static_cast<std::int64_t>(R),
                                    centres.data(), static_cast<std::int64_t>(centres.size()), can_take.data(), keys_only,
                                    0.05f, best.data(), second.data(), centre.data(), any.data());
      });
      int zero_class = 0;
      for (std::size_t i = 0; i < R; ++i) {
        const std::string where = std::string(dtype_name(t)) + (keys_only ? " keys" : " kv") + " rest " + std::to_string(rest[i]);
        EXPECT_NEAR(best[i], want.best[i], 1e-5) << where;
        EXPECT_NEAR(second[i], want.second[i], 1e-5) << where;
        EXPECT_NEAR(any[i], want.any[i], 1e-5) << where;
        zero_class += want.centre[i] < 0;
        // The assignment itself wherever the reference decided outside the margin.
        if (want.best[i] - want.second[i] > 1e-4 && std::abs(want.best[i] - c.tau) > 1e-4) {
          EXPECT_EQ(centre[i], want.centre[i]) << where;
        }
      }
      EXPECT_EQ(centre[3], 17) << "a copy of a centre joins it";
      EXPECT_EQ(centre[2], -1) << "a zero key goes to the zero class";
      EXPECT_GT(zero_class, 0);
      EXPECT_LT(zero_class, static_cast<int>(R));
    }
}

TEST(CpuKernels, CamMergeProbabilitiesFollowTheStreamedPrompt) {
  const std::int64_t T = 45, B = 13, sinks = 3, width = 4;
  const int d = 16, hq = 6, hkv = 2, G = 3;
  for (DType t : kDtypes)
    for (auto att : {opt::cpu::CamAttention::kCumulative, opt::cpu::CamAttention::kStep, opt::cpu::CamAttention::kDecode})
      for (bool denom_max : {false, true}) {
        const Heads q = random_heads(hq, T, d, t, 61), k = random_heads(hkv, T, d, t, 62);
        std::vector<float> p(static_cast<std::size_t>(hkv * T), std::nanf(""));
        opt::cpu::dispatch_storage(t, [&](auto tag) {
          using S = decltype(tag);
          opt::cpu::cam_merge_probabilities({hq, hkv, d, T}, q.storage.data<S>(), k.storage.data<S>(), sinks, B, width,
                                            denom_max, att, p.data());
        });
        int strictly_inside = 0;
        for (int g = 0; g < hkv; ++g) {
          // The stream in double: cache = sinks + the latest B - sinks tokens.
          std::vector<double> abar(static_cast<std::size_t>(T), 0.0), want(static_cast<std::size_t>(T), 0.0);
          for (std::int64_t s = 0; s < T; ++s) {
            std::vector<std::int64_t> cache;
            for (std::int64_t j = 0; j <= s; ++j)
              if (s + 1 <= B || j < sinks || j > s - (B - sinks)) cache.push_back(j);
            if (s >= B) {
              const std::int64_t e = s - (B - sinks);
              double denom = 0;
              for (std::int64_t j = e + 1; j <= e + std::min(width, B - sinks); ++j) denom += abar[static_cast<std::size_t>(j)];
              denom /= static_cast<double>(std::min(width, B - sinks));
              if (denom_max) {
                denom = abar[static_cast<std::size_t>(e)];
                for (std::int64_t j : cache) denom = std::max(denom, abar[static_cast<std::size_t>(j)]);
              }
              const double r = abar[static_cast<std::size_t>(e)] / denom;
              want[static_cast<std::size_t>(e)] = std::isnan(r) ? 0.0 : std::clamp(r, 0.0, 1.0);
            }
            if (att == opt::cpu::CamAttention::kDecode) continue;
            if (att == opt::cpu::CamAttention::kStep) std::fill(abar.begin(), abar.end(), 0.0);
            for (int h = g * G; h < (g + 1) * G; ++h) {
              VecX logits(static_cast<Eigen::Index>(cache.size()));
              for (std::size_t j = 0; j < cache.size(); ++j)
                logits[static_cast<Eigen::Index>(j)] =
                    q.mats[static_cast<std::size_t>(h)].row(s).dot(k.mats[static_cast<std::size_t>(g)].row(cache[j])) / std::sqrt(double(d));
              const VecX pr = ref::softmax(logits);
              for (std::size_t j = 0; j < cache.size(); ++j) abar[static_cast<std::size_t>(cache[j])] += pr[static_cast<Eigen::Index>(j)] / G;
            }
          }
          for (std::int64_t j = 0; j < T; ++j) {
            EXPECT_NEAR(p[static_cast<std::size_t>(g * T + j)], want[static_cast<std::size_t>(j)], 2e-5)
                << dtype_name(t) << " attention " << static_cast<int>(att) << " max " << denom_max << " kv " << g << " token " << j;
            strictly_inside += want[static_cast<std::size_t>(j)] > 0.01 && want[static_cast<std::size_t>(j)] < 0.99;
          }
        }
        if (att != opt::cpu::CamAttention::kDecode) {
          EXPECT_GT(strictly_inside, 0) << "the gate is exercised";
        }
      }
}

TEST(CpuKernels, DecodeAttentionOverManyChunksMatchesReferenceOnAnyThreadCount) {
  // 1300 slots: several fixed-size slot chunks and a partial key block, merged in order.
  const int Hq = 4, Hkv = 2, d = 32;
  const std::int64_t offsets[] = {0, 1300, 1337};
  const Heads k = random_heads(1, 1337, d, DType::kF16, 31), v = random_heads(1, 1337, d, DType::kF16, 32),
              q = random_heads(Hq, 1, d, DType::kF32, 33);
  auto run = [&] {
    std::vector<float> out(Hq * d, NAN);
    opt::cpu::decode_attention<opt::cpu::f16>(q.tensor.data.data(), Hq, Hkv, d, offsets, k.storage.data<opt::cpu::f16>(),
                                              v.storage.data<opt::cpu::f16>(), nullptr, out.data());
    return out;
  };
  const auto [one, three] = on_1_and_3_threads(run);
  expect_same_bits(one, three);
  for (int h = 0; h < Hq; ++h) {
    const std::int64_t first = offsets[h / 2], n = offsets[h / 2 + 1] - first;
    const VecX want = ref::attend(q.mats[static_cast<std::size_t>(h)].row(0).transpose(), k.mats[0].middleRows(first, n),
                                  v.mats[0].middleRows(first, n), nullptr).output;
    EXPECT_LT(max_rel_diff(one.data() + h * d, want), 1e-5) << "q head " << h;
  }
}

TEST(CpuKernels, KeptRowsRoundLikeTheAccumulationIncludingNegativeZeroAndNaN) {
  // A kept token is copied only when the copy equals from_f32(0 + 1 * x): -0 must still become +0, NaN Eigen's NaN.
  for (DType t : kDtypes) {
    const int d = 16;
    opt::StorageBuffer k(t, 2 * d), v(t, 2 * d);
    for (int i = 0; i < 2 * d; ++i) k.set(i, static_cast<float>(i) - 7.5f), v.set(i, 0.25f * static_cast<float>(i));
    k.set(3, -0.0f);
    v.set(d + 5, NAN);
    const std::int64_t offsets[] = {0, 2}, row_ptr[] = {0, 1, 2}, token[] = {0, 1};
    const float one[] = {1.0f, 1.0f};
    const opt::cpu::RaggedPlan rp{1, offsets, row_ptr, token, one, one, nullptr, 10000.0};
    opt::StorageBuffer ko(t, 2 * d), vo(t, 2 * d);
    ko.poison();
    vo.poison();
    opt::cpu::dispatch_storage(t, [&](auto tag) {
      using S = decltype(tag);
      opt::cpu::apply_ragged_plan<S>(rp, k.data<S>(), v.data<S>(), 2, d, ko.data<S>(), vo.data<S>());
      for (int i = 0; i < 2 * d; ++i) {
        const S wk = opt::cpu::from_f32<S>(0.0f + opt::cpu::to_f32(k.data<S>()[i]));
        const S wv = opt::cpu::from_f32<S>(0.0f + opt::cpu::to_f32(v.data<S>()[i]));
        EXPECT_EQ(std::memcmp(&wk, ko.data<S>() + i, sizeof(S)), 0) << dtype_name(t) << " k " << i;
        EXPECT_EQ(std::memcmp(&wv, vo.data<S>() + i, sizeof(S)), 0) << dtype_name(t) << " v " << i;
      }
    });
    EXPECT_FALSE(std::signbit(ko.get(3))) << dtype_name(t);
  }
}

TEST(CpuKernels, GatherAndCosinesAreBitwiseIdenticalAcrossThreadCounts) {
  const int H = 2, d = 32;
  const std::int64_t T = 700;
  const opt::cpu::LayerShape s{2, H, d, T};
  const Heads k = random_heads(H, T, d, DType::kBF16, 41), v = random_heads(H, T, d, DType::kBF16, 42);
  std::mt19937_64 rng(43);
  std::vector<Plan> plans;
  for (int h = 0; h < H; ++h) plans.push_back(random_plan(T, rng, h == 1));
  const opt::FlatPlans flat = opt::flatten(plans);
  const opt::cpu::RaggedPlan rp = flat.view(10000.0);
  auto run = [&] {
    opt::StorageBuffer ko(DType::kBF16, flat.offsets.back() * d), vo(DType::kBF16, flat.offsets.back() * d);
    opt::cpu::apply_ragged_plan<opt::cpu::bf16>(rp, k.storage.data<opt::cpu::bf16>(), v.storage.data<opt::cpu::bf16>(), T, d,
                                                ko.data<opt::cpu::bf16>(), vo.data<opt::cpu::bf16>());
    std::vector<float> out(static_cast<std::size_t>(H * (T - 1)));
    opt::cpu::adjacent_key_cosine(s, k.storage.data<opt::cpu::bf16>(), out.data());
    for (std::int64_t i = 0; i < flat.offsets.back() * d; ++i) out.push_back(ko.get(i)), out.push_back(vo.get(i));
    return out;
  };
  const auto [one, three] = on_1_and_3_threads(run);
  expect_same_bits(one, three);
}

TEST(CpuKernels, TopKOfShuffledCandidatesWithSignedZerosEqualsReference) {
  std::mt19937_64 rng(44);
  for (int trial = 0; trial < 100; ++trial) {
    const std::int64_t n = 1 + static_cast<std::int64_t>(rng() % 300);
    std::vector<float> s(static_cast<std::size_t>(n));
    VecX sd(n);
    const float values[] = {-0.0f, 0.0f, 1.0f, -1.0f, -INFINITY, INFINITY, 1e-45f, -1e-45f};
    for (std::int64_t j = 0; j < n; ++j) s[static_cast<std::size_t>(j)] = values[rng() % 8], sd[j] = s[static_cast<std::size_t>(j)];
    std::vector<std::int64_t> cand;
    for (std::int64_t j = 0; j < n; ++j)
      if (rng() % 3 != 0) cand.push_back(j);
    std::shuffle(cand.begin(), cand.end(), rng);
    const std::int64_t k = static_cast<std::int64_t>(rng() % (cand.size() + 2));
    std::vector<std::int64_t> kept;
    opt::cpu::top_k(s.data(), cand, k, kept);
    EXPECT_EQ(kept, ref::top_k(sd, cand, k).kept) << "trial " << trial;
  }
}

}  // namespace
