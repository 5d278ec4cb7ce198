// Every CUDA kernel against its CPU counterpart (itself checked against the
// reference by test_cpu_kernels), in every storage dtype, on fixed-seed
// random inputs: ggml test-backend-ops style, one backend compared with the
// one below it. Outputs are NaN-poisoned before each kernel; each kernel also
// runs twice and must give the same bits. Without a CUDA device every test
// skips and says why (ctest label `gpu`).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kvscope/core/tolerance.hpp"
#include "kvscope/opt/cpu/ragged.hpp"
#include "kvscope/opt/cpu/scores.hpp"
#include "kvscope/opt/cpu/select.hpp"
#include "kvscope/opt/cuda/device.hpp"
#include "kvscope/opt/cuda/kernels.hpp"
#include "kvscope/opt/layer_storage.hpp"

using namespace kvscope;
namespace cuda = opt::cuda;
using cuda::DeviceBuffer;

#define KVSCOPE_REQUIRE_GPU()                                                 \
  do {                                                                        \
    std::string why;                                                          \
    if (!cuda::device_available(&why)) GTEST_SKIP() << "no CUDA device: " << why; \
  } while (0)

namespace {

constexpr DType kDtypes[] = {DType::kF32, DType::kF16, DType::kBF16};

/// Standard normals rounded to `t`: host storage and a device copy.
struct Data {
  opt::StorageBuffer host;
  DeviceBuffer dev;
};

Data device_data(std::int64_t n, DType t, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  Data d{opt::StorageBuffer(t, n), DeviceBuffer(static_cast<std::size_t>(n * dtype_bytes(t)))};
  for (std::int64_t i = 0; i < n; ++i) d.host.set(i, scale * g(rng));
  opt::cpu::dispatch_storage(t, [&](auto tag) {
    using S = decltype(tag);
    d.dev.upload(d.host.data<S>(), static_cast<std::size_t>(n) * sizeof(S));
  });
  return d;
}

/// A poisoned (NaN) device buffer of n floats.
DeviceBuffer poisoned_floats(std::int64_t n) {
  DeviceBuffer b(static_cast<std::size_t>(std::max<std::int64_t>(n, 1)) * sizeof(float));
  b.fill(0xff);
  return b;
}

/// Largest |got - want| over max|want| (finite check included: NaN fails).
double max_rel_diff(const std::vector<float>& got, const std::vector<float>& want) {
  double scale = 1e-30, worst = 0;
  for (float w : want) scale = std::max(scale, static_cast<double>(std::abs(w)));
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    worst = std::max(worst, std::abs(static_cast<double>(got[i]) - want[i]) / scale);
  }
  return worst;
}

/// fp32 compute on both sides in different orders: a few ulps of the largest value.
constexpr double kFp32Order = 2e-5;

struct Shape {
  int hq, hkv, d;
  std::int64_t T;
};
constexpr Shape kShapes[] = {{4, 2, 64, 77}, {8, 1, 128, 300}, {3, 3, 6, 5}, {2, 1, 2, 1}};

/// The shapes a sweep runs: all of kShapes, or under compute-sanitizer
/// (scripts/gpu-check sets KVSCOPE_GPU_SANITIZER=1), where the tiled kernels
/// run orders of magnitude slower, the two that still cross a 64-tile edge
/// and a depth tail: {4, 2, 64, 77} and {3, 3, 6, 5}.
std::vector<Shape> shapes() {
  const char* env = std::getenv("KVSCOPE_GPU_SANITIZER");
  if (env != nullptr && std::string(env) == "1") return {kShapes[0], kShapes[2]};
  return {std::begin(kShapes), std::end(kShapes)};
}

std::string label(const Shape& s, DType t) {
  return "hq " + std::to_string(s.hq) + " hkv " + std::to_string(s.hkv) + " d " + std::to_string(s.d) + " T " +
         std::to_string(s.T) + " " + dtype_name(t);
}

}  // namespace

TEST(CudaKernels, WindowScoresMatchCpuInEveryDtypeAndReduction) {
  KVSCOPE_REQUIRE_GPU();
  for (const Shape& sh : shapes())
    for (DType t : kDtypes)
      for (std::int64_t window : {std::int64_t{1}, std::int64_t{9}, std::int64_t{32}, sh.T + 3})
        for (auto rows : {cuda::Reduce::kSum, cuda::Reduce::kMean, cuda::Reduce::kMax}) {
          const cuda::LayerShape s{sh.hq, sh.hkv, sh.d, sh.T};
          const Data q = device_data(sh.hq * sh.T * sh.d, t, 11), k = device_data(sh.hkv * sh.T * sh.d, t, 12);
          std::vector<float> want(static_cast<std::size_t>(sh.hq * sh.T));
          opt::cpu::dispatch_storage(t, [&](auto tag) {
            using S = decltype(tag);
            opt::cpu::window_scores<S>(s, q.host.data<S>(), k.host.data<S>(), window, rows, want.data());
          });
          DeviceBuffer out = poisoned_floats(sh.hq * sh.T);
          cuda::window_scores(s, t, q.dev.get(), k.dev.get(), window, rows, out.as<float>());
          const std::vector<float> got = out.to_vector<float>(want.size());
          EXPECT_LE(max_rel_diff(got, want), kFp32Order) << label(sh, t) << " window " << window;
          cuda::window_scores(s, t, q.dev.get(), k.dev.get(), window, rows, out.as<float>());
          EXPECT_EQ(0, std::memcmp(got.data(), out.to_vector<float>(want.size()).data(), got.size() * sizeof(float)))
              << "not deterministic: " << label(sh, t);
        }
}

TEST(CudaKernels, AccumulatedAttentionMatchesCpu) {
  KVSCOPE_REQUIRE_GPU();
  for (const Shape& sh : shapes())
    for (DType t : kDtypes)
      for (bool per_query : {false, true}) {
        const cuda::LayerShape s{sh.hq, sh.hkv, sh.d, sh.T};
        const Data q = device_data(sh.hq * sh.T * sh.d, t, 21), k = device_data(sh.hkv * sh.T * sh.d, t, 22);
        std::vector<float> want(static_cast<std::size_t>(sh.hq * sh.T));
        opt::cpu::dispatch_storage(t, [&](auto tag) {
          using S = decltype(tag);
          opt::cpu::accumulated_attention<S>(s, q.host.data<S>(), k.host.data<S>(), per_query, want.data());
        });
        DeviceBuffer out = poisoned_floats(sh.hq * sh.T);
        cuda::accumulated_attention(s, t, q.dev.get(), k.dev.get(), per_query, out.as<float>());
        EXPECT_LE(max_rel_diff(out.to_vector<float>(want.size()), want), kFp32Order) << label(sh, t);
      }
}

TEST(CudaKernels, KeyNormsPoolingAndGroupReduceMatchCpu) {
  KVSCOPE_REQUIRE_GPU();
  for (const Shape& sh : shapes())
    for (DType t : kDtypes) {
      const cuda::LayerShape s{sh.hq, sh.hkv, sh.d, sh.T};
      const Data k = device_data(sh.hkv * sh.T * sh.d, t, 31);
      std::vector<float> want(static_cast<std::size_t>(sh.hkv * sh.T));
      opt::cpu::dispatch_storage(t, [&](auto tag) {
        using S = decltype(tag);
        opt::cpu::key_norm_scores<S>(s, k.host.data<S>(), want.data());
      });
      DeviceBuffer out = poisoned_floats(sh.hkv * sh.T);
      cuda::key_norm_scores(s, t, k.dev.get(), out.as<float>());
      EXPECT_LE(max_rel_diff(out.to_vector<float>(want.size()), want), kFp32Order) << label(sh, t);
    }
  // Pooling and the group reduction are the CPU loops one element per thread: the same bits.
  std::mt19937_64 rng(32);
  std::normal_distribution<float> g;
  const int q_heads = 6, kv_heads = 2;
  const std::int64_t n = 101;
  std::vector<float> x(static_cast<std::size_t>(q_heads * n));
  for (float& v : x) v = g(rng);
  const DeviceBuffer dx = DeviceBuffer::from(x);
  for (auto pool : {cuda::Pool::kNone, cuda::Pool::kAvg, cuda::Pool::kMax})
    for (std::int64_t kernel : {1, 3, 7, 201}) {
      std::vector<float> want(x.size());
      for (int r = 0; r < q_heads; ++r) opt::cpu::pool1d(&x[static_cast<std::size_t>(r * n)], n, kernel, pool, &want[static_cast<std::size_t>(r * n)]);
      DeviceBuffer out = poisoned_floats(q_heads * n);
      cuda::pool1d(dx.as<float>(), q_heads, n, kernel, pool, out.as<float>());
      EXPECT_EQ(out.to_vector<float>(want.size()), want) << "pool kernel " << kernel;
    }
  for (auto r : {cuda::Reduce::kSum, cuda::Reduce::kMean, cuda::Reduce::kMax}) {
    std::vector<float> want(static_cast<std::size_t>(kv_heads * n));
    opt::cpu::group_reduce(x.data(), q_heads, kv_heads, n, r, want.data());
    DeviceBuffer out = poisoned_floats(kv_heads * n);
    cuda::group_reduce(dx.as<float>(), q_heads, kv_heads, n, r, out.as<float>());
    EXPECT_EQ(out.to_vector<float>(want.size()), want);
  }
}

TEST(CudaKernels, SegmentedTopKKeepsExactlyTheCpuSelectionWithTies) {
  KVSCOPE_REQUIRE_GPU();
  std::mt19937_64 rng(41);
  // 70000 tokens do not fit shared memory (4 bytes each): the unstaged path.
  for (std::int64_t n : {1, 2, 7, 300, 5000, 70000}) {
    const int rows = 5;
    std::vector<float> scores(static_cast<std::size_t>(rows * n));
    std::vector<std::uint8_t> cand(scores.size());
    std::uniform_int_distribution<int> level(-20, 20), coin(0, 3);
    for (std::size_t i = 0; i < scores.size(); ++i) {
      scores[i] = static_cast<float>(level(rng)) * 0.25f;  // many exact ties, +0 and -0 both
      if (scores[i] == 0.0f && coin(rng) == 0) scores[i] = -0.0f;
      cand[i] = coin(rng) != 0;
    }
    std::vector<std::int64_t> k = {0, 1, n / 3, n, n + 5};
    const DeviceBuffer ds = DeviceBuffer::from(scores), dc = DeviceBuffer::from(cand), dk = DeviceBuffer::from(k);
    DeviceBuffer kept(static_cast<std::size_t>(rows * n));
    kept.fill(0x7f);
    cuda::top_k_mask(ds.as<float>(), dc.as<std::uint8_t>(), rows, n, dk.as<std::int64_t>(), kept.as<std::uint8_t>());
    const std::vector<std::uint8_t> got = kept.to_vector<std::uint8_t>(scores.size());
    for (int r = 0; r < rows; ++r) {
      std::vector<std::int64_t> candidates, want;
      for (std::int64_t j = 0; j < n; ++j)
        if (cand[static_cast<std::size_t>(r * n + j)]) candidates.push_back(j);
      opt::cpu::top_k(&scores[static_cast<std::size_t>(r * n)], candidates, k[static_cast<std::size_t>(r)], want);
      std::vector<std::int64_t> have;
      for (std::int64_t j = 0; j < n; ++j) {
        const std::uint8_t m = got[static_cast<std::size_t>(r * n + j)];
        ASSERT_TRUE(m == 0 || m == 1) << "row " << r << " token " << j << " not written";
        if (m) have.push_back(j);
      }
      EXPECT_EQ(have, want) << "n " << n << " row " << r << " k " << k[static_cast<std::size_t>(r)];
    }
  }
}

TEST(CudaKernels, AdjacentCosineAndMergeSegments) {
  KVSCOPE_REQUIRE_GPU();
  for (const Shape& sh : shapes())
    for (DType t : kDtypes) {
      if (sh.T < 2) continue;
      const cuda::LayerShape s{sh.hq, sh.hkv, sh.d, sh.T};
      const Data k = device_data(sh.hkv * sh.T * sh.d, t, 51, 1e-20f);  // tiny keys: the scaling matters
      std::vector<float> want(static_cast<std::size_t>(sh.hkv * (sh.T - 1)));
      opt::cpu::dispatch_storage(t, [&](auto tag) {
        using S = decltype(tag);
        opt::cpu::adjacent_key_cosine<S>(s, k.host.data<S>(), want.data());
      });
      DeviceBuffer out = poisoned_floats(static_cast<std::int64_t>(want.size()));
      cuda::adjacent_key_cosine(s, t, k.dev.get(), out.as<float>());
      EXPECT_LE(max_rel_diff(out.to_vector<float>(want.size()), want), kFp32Order) << label(sh, t);
    }
  // Segmentation: token j + 1 joins j's set when sim[j] > threshold; longer than one scan tile.
  std::mt19937_64 rng(52);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int rows = 3;
  const std::int64_t n = 700;
  std::vector<float> sim(static_cast<std::size_t>(rows * (n - 1)));
  for (float& v : sim) v = u(rng);
  const float threshold = 0.2f;
  std::vector<std::int64_t> want(static_cast<std::size_t>(rows * n));
  for (int r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < n; ++j)
      want[static_cast<std::size_t>(r * n + j)] =
          j > 0 && sim[static_cast<std::size_t>(r * (n - 1) + j - 1)] > threshold ? want[static_cast<std::size_t>(r * n + j - 1)] : j;
  const DeviceBuffer ds = DeviceBuffer::from(sim);
  DeviceBuffer seg(want.size() * sizeof(std::int64_t));
  seg.fill(0xff);
  cuda::merge_segments(ds.as<float>(), rows, n, threshold, seg.as<std::int64_t>());
  EXPECT_EQ(seg.to_vector<std::int64_t>(want.size()), want);
}

TEST(CudaKernels, RaggedPlanAndDecodeAttentionMatchCpu) {
  KVSCOPE_REQUIRE_GPU();
  std::mt19937_64 rng(61);
  // (q heads, kv heads, d): 16-byte vector paths (d 64), odd d (RoPE leaves the last element alone) and
  // d/2 = 3 (scalar path). Per-head slot counts include an empty head and one over two 128-slot chunks.
  struct Case {
    int hq, hkv, d;
  };
  const std::int64_t kSlots[] = {40, 0, 147, 7};
  for (const Case& cs : {Case{8, 4, 64}, Case{6, 2, 7}, Case{4, 4, 6}})
    for (DType t : kDtypes)
      for (bool bias : {false, true}) {
        const int hq = cs.hq, hkv = cs.hkv, d = cs.d;
        const std::int64_t T = 150;
        const Data k = device_data(hkv * T * d, t, 62), v = device_data(hkv * T * d, t, 63);
        // Per head: slots of 1..3 random tokens with random weights, some re-rotated.
        std::vector<std::int64_t> offsets{0}, row_ptr{0}, token, rotate;
        std::vector<float> ck, cv;
        std::uniform_int_distribution<std::int64_t> tok(0, T - 1), len(1, 3), shift(-40, 40);
        std::uniform_real_distribution<float> w(0.1f, 1.0f);
        for (int h = 0; h < hkv; ++h) {
          const std::int64_t slots = kSlots[h % 4];
          for (std::int64_t r = 0; r < slots; ++r) {
            for (std::int64_t e = len(rng); e > 0; --e) {
              token.push_back(tok(rng));
              ck.push_back(w(rng));
              cv.push_back(w(rng));
            }
            row_ptr.push_back(static_cast<std::int64_t>(token.size()));
            rotate.push_back(r % 3 == 0 ? shift(rng) : 0);
          }
          offsets.push_back(offsets.back() + slots);
        }
        const std::int64_t total = offsets.back();
        opt::cpu::RaggedPlan host{hkv, offsets.data(), row_ptr.data(), token.data(), ck.data(), cv.data(), rotate.data(), 10000.0};
        const DeviceBuffer doff = DeviceBuffer::from(offsets), drow = DeviceBuffer::from(row_ptr),
                           dtok = DeviceBuffer::from(token), dck = DeviceBuffer::from(ck), dcv = DeviceBuffer::from(cv),
                           drot = DeviceBuffer::from(rotate);
        cuda::RaggedPlan dev{hkv, doff.as<std::int64_t>(), drow.as<std::int64_t>(), dtok.as<std::int64_t>(),
                             dck.as<float>(), dcv.as<float>(), drot.as<std::int64_t>(), 10000.0};
        std::vector<float> q(static_cast<std::size_t>(hq * d)), log_bias(static_cast<std::size_t>(total));
        std::normal_distribution<float> g;
        for (float& x : q) x = g(rng);
        for (std::int64_t r = 0; r < total; ++r)
          log_bias[static_cast<std::size_t>(r)] = std::log(static_cast<float>(row_ptr[static_cast<std::size_t>(r + 1)] - row_ptr[static_cast<std::size_t>(r)]));
        const DeviceBuffer dq = DeviceBuffer::from(q), dbias = DeviceBuffer::from(log_bias);

        opt::StorageBuffer ko(t, total * d), vo(t, total * d);
        std::vector<float> want(static_cast<std::size_t>(hq * d));
        DeviceBuffer dko(static_cast<std::size_t>(total * d * dtype_bytes(t))), dvo(dko.bytes());
        dko.fill(0xff);
        dvo.fill(0xff);
        cuda::apply_ragged_plan(dev, total, t, k.dev.get(), v.dev.get(), T, d, dko.get(), dvo.get());
        DeviceBuffer out = poisoned_floats(hq * d);
        cuda::decode_attention(dq.as<float>(), hq, hkv, d, doff.as<std::int64_t>(), total, t, dko.get(), dvo.get(),
                               bias ? dbias.as<float>() : nullptr, out.as<float>());
        opt::cpu::dispatch_storage(t, [&](auto tag) {
          using S = decltype(tag);
          opt::cpu::apply_ragged_plan<S>(host, k.host.data<S>(), v.host.data<S>(), T, d, ko.data<S>(), vo.data<S>());
          // Compare the caches: one rounding to S of nearly equal fp32 sums, so at most one ulp of S apart.
          std::vector<S> gk(static_cast<std::size_t>(total * d)), gv(gk.size());
          dko.download(gk.data(), gk.size() * sizeof(S));
          dvo.download(gv.data(), gv.size() * sizeof(S));
          const double ulp = t == DType::kF32 ? 1e-6 : t == DType::kF16 ? 1e-3 : 8e-3;
          for (std::size_t i = 0; i < gk.size(); ++i) {
            const float a = static_cast<float>(gk[i]), b = ko.get(static_cast<std::int64_t>(i));
            const float c = static_cast<float>(gv[i]), e = vo.get(static_cast<std::int64_t>(i));
            ASSERT_TRUE(std::isfinite(a) && std::isfinite(c)) << "slot value " << i << " not written";
            ASSERT_LE(std::abs(a - b), ulp * std::max(1.0f, std::abs(b)) * 2) << dtype_name(t) << " d " << d << " key " << i;
            ASSERT_LE(std::abs(c - e), ulp * std::max(1.0f, std::abs(e)) * 2) << dtype_name(t) << " d " << d << " value " << i;
          }
          // Decode attention on the CPU's cache: both sides then read the same storage.
          const DeviceBuffer ck_same = [&] {
            DeviceBuffer b(static_cast<std::size_t>(total * d) * sizeof(S));
            b.upload(ko.data<S>(), b.bytes());
            return b;
          }();
          const DeviceBuffer cv_same = [&] {
            DeviceBuffer b(static_cast<std::size_t>(total * d) * sizeof(S));
            b.upload(vo.data<S>(), b.bytes());
            return b;
          }();
          opt::cpu::decode_attention<S>(q.data(), hq, hkv, d, offsets.data(), ko.data<S>(), vo.data<S>(),
                                        bias ? log_bias.data() : nullptr, want.data());
          cuda::decode_attention(dq.as<float>(), hq, hkv, d, doff.as<std::int64_t>(), total, t, ck_same.get(),
                                 cv_same.get(), bias ? dbias.as<float>() : nullptr, out.as<float>());
        });
        EXPECT_LE(max_rel_diff(out.to_vector<float>(want.size()), want), kFp32Order)
            << dtype_name(t) << " hq " << hq << " hkv " << hkv << " d " << d << " bias " << bias;
      }
}

// Bitwise determinism over many runs (scripts/gpu-check sets KVSCOPE_GPU_RUNS=100):
// every kernel whose reductions could race is run N times on one input.
TEST(CudaKernels, SameBitsOnEveryRun) {
  KVSCOPE_REQUIRE_GPU();
  const char* env = std::getenv("KVSCOPE_GPU_RUNS");
  const int runs = env ? std::max(2, std::atoi(env)) : 3;
  const cuda::LayerShape s{8, 2, 128, 1000};
  const DType t = DType::kBF16;
  const Data q = device_data(s.q_heads * s.tokens * s.head_dim, t, 71), k = device_data(s.kv_heads * s.tokens * s.head_dim, t, 72);
  DeviceBuffer out = poisoned_floats(s.q_heads * s.tokens);
  std::vector<float> first;
  for (int run = 0; run < runs; ++run) {
    cuda::window_scores(s, t, q.dev.get(), k.dev.get(), 64, cuda::Reduce::kMean, out.as<float>());
    std::vector<float> got = out.to_vector<float>(static_cast<std::size_t>(s.q_heads * s.tokens));
    cuda::accumulated_attention(s, t, q.dev.get(), k.dev.get(), false, out.as<float>());
    const std::vector<float> acc = out.to_vector<float>(got.size());
    got.insert(got.end(), acc.begin(), acc.end());
    if (run == 0)
      first = got;
    else
      ASSERT_EQ(0, std::memcmp(first.data(), got.data(), got.size() * sizeof(float))) << "run " << run << " of " << runs;
  }
}
