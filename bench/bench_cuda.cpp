// GPU benchmarks of the CUDA kernels (docs/performance.md, "CUDA"): CUDA
// events around each launch, warm-up first, the median of the timed runs
// (Google Benchmark's manual time gets the same median), inputs rotated among
// copies that together exceed the L2 cache, and every memory-bound kernel's
// bandwidth as a ratio to a device-to-device copy measured in the same run.
// The shape is the CPU suite's: 32 q heads, 8 kv heads, d 128, T 8192.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <random>
#include <string>
#include <vector>

#include "kvscope/opt/cuda/device.hpp"
#include "kvscope/opt/cuda/kernels.hpp"

namespace {

using namespace kvscope;
namespace cuda = opt::cuda;

constexpr int kWarmup = 3, kTimed = 21, kCopies = 6, kBatch = 8;  // 6 x 34 MB of K+V (bf16) > the 50 MB L2 of an H100
const cuda::LayerShape kShape{32, 8, 128, 8192};
constexpr DType kDtype = DType::kBF16;

void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(rc));
}

/// Median milliseconds per launch of `launch(i)`: kTimed samples after
/// kWarmup launches, each sample `batch` back-to-back launches (on rotating
/// inputs) between one event pair, divided by `batch`. A batch is the steady
/// state of a prefill (one launch per layer): a single microsecond-scale
/// launch would time its own start-up and tail more than its work.
template <class F>
double median_ms(F&& launch, int batch = 1) {
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  for (int i = 0; i < kWarmup; ++i) launch(i);
  std::vector<double> ms;
  for (int i = 0; i < kTimed; ++i) {
    check(cudaEventRecord(a), "cudaEventRecord");
    for (int j = 0; j < batch; ++j) launch(kWarmup + i * batch + j);
    check(cudaEventRecord(b), "cudaEventRecord");
    check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float t = 0;
    check(cudaEventElapsedTime(&t, a, b), "cudaEventElapsedTime");
    ms.push_back(static_cast<double>(t) / batch);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::nth_element(ms.begin(), ms.begin() + kTimed / 2, ms.end());
  return ms[kTimed / 2];
}

/// Device-to-device copy bandwidth (bytes read + written per second) of 512 MiB: the limit.
double copy_Bps() {
  static const double bps = [] {
    const std::size_t n = 512ull << 20;
    cuda::DeviceBuffer src(n), dst(n);
    src.fill(1);
    const double ms = median_ms([&](int) { check(cudaMemcpyAsync(dst.get(), src.get(), n, cudaMemcpyDeviceToDevice), "copy"); });
    return 2.0 * static_cast<double>(n) / (ms * 1e-3);
  }();
  return bps;
}

/// kCopies layers of random bf16 q, k, v on the device (rotated between runs).
struct Layers {
  std::vector<cuda::DeviceBuffer> q, k, v;
  std::int64_t q_elems = static_cast<std::int64_t>(kShape.q_heads) * kShape.tokens * kShape.head_dim;
  std::int64_t kv_elems = static_cast<std::int64_t>(kShape.kv_heads) * kShape.tokens * kShape.head_dim;
  Layers() {
    std::mt19937 rng(1);
    std::normal_distribution<float> g;
    auto make = [&](std::int64_t n) {
      std::vector<std::uint16_t> host(static_cast<std::size_t>(n));
      for (auto& x : host) {
        const float f = g(rng);
        std::uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        x = static_cast<std::uint16_t>(u >> 16);  // bf16 by truncation: any values do for timing
      }
      return cuda::DeviceBuffer::from(host);
    };
    for (int c = 0; c < kCopies; ++c) {
      q.push_back(make(q_elems));
      k.push_back(make(kv_elems));
      v.push_back(make(kv_elems));
    }
  }
};
const Layers& layers() {
  static const Layers l;
  return l;
}

bool skip_without_device(benchmark::State& state) {
  std::string why;
  if (cuda::device_available(&why)) return false;
  state.SkipWithError(("no CUDA device: " + why).c_str());
  return true;
}

/// Reports a run: manual time = the median; for memory-bound kernels the bytes
/// and the ratio to the copy limit, for compute-bound ones the useful FLOP rate.
void report(benchmark::State& state, double ms, double bytes, double flops = 0) {
  for (auto _ : state) state.SetIterationTime(ms * 1e-3);
  state.counters["median_ms"] = ms;
  if (bytes > 0) {
    const double bps = bytes / (ms * 1e-3);
    state.counters["GBps"] = bps / 1e9;
    state.counters["bw_ratio"] = bps / copy_Bps();
  }
  if (flops > 0) state.counters["TFLOPs"] = flops / (ms * 1e-3) / 1e12;
  state.SetLabel(cuda::device_name());
}

/// FLOPs of the two softmax-column passes over rows T - rows .. T - 1 (causal):
/// q.k for each visible (query, key) pair, computed in both passes.
double softmax_column_flops(std::int64_t rows) {
  const double T = static_cast<double>(kShape.tokens), r = static_cast<double>(rows);
  const double pairs = r * T - r * (r - 1) / 2;  // sum over queries t of (t + 1) keys
  return 2.0 * 2.0 * kShape.head_dim * pairs * kShape.q_heads;
}

void BM_copy_limit(benchmark::State& state) {
  if (skip_without_device(state)) return;
  report(state, 2.0 * (512ull << 20) / copy_Bps() * 1e3, 2.0 * (512ull << 20));
}

void BM_key_norm_scores(benchmark::State& state) {
  if (skip_without_device(state)) return;
  const Layers& L = layers();
  cuda::DeviceBuffer out(static_cast<std::size_t>(kShape.kv_heads * kShape.tokens) * sizeof(float));
  const double ms = median_ms(
      [&](int i) { cuda::key_norm_scores(kShape, kDtype, L.k[static_cast<std::size_t>(i % kCopies)].get(), out.as<float>()); },
      kBatch);
  report(state, ms, static_cast<double>(L.kv_elems) * 2 + static_cast<double>(out.bytes()));
}

void BM_window_scores(benchmark::State& state) {
  if (skip_without_device(state)) return;
  const Layers& L = layers();
  cuda::DeviceBuffer out(static_cast<std::size_t>(kShape.q_heads * kShape.tokens) * sizeof(float));
  const double ms = median_ms([&](int i) {
    const auto c = static_cast<std::size_t>(i % kCopies);
    cuda::window_scores(kShape, kDtype, L.q[c].get(), L.k[c].get(), 32, cuda::Reduce::kSum, out.as<float>());
  }, kBatch);
  report(state, ms, 0, softmax_column_flops(32));
}

void BM_accumulated_attention(benchmark::State& state) {
  if (skip_without_device(state)) return;
  const Layers& L = layers();
  cuda::DeviceBuffer out(static_cast<std::size_t>(kShape.q_heads * kShape.tokens) * sizeof(float));
  const double ms = median_ms([&](int i) {
    const auto c = static_cast<std::size_t>(i % kCopies);
    cuda::accumulated_attention(kShape, kDtype, L.q[c].get(), L.k[c].get(), false, out.as<float>());
  });
  report(state, ms, 0, softmax_column_flops(kShape.tokens));
}

/// Eviction to half the tokens (every other one) through the ragged kernel, then decode attention over it.
struct HalfPlan {
  cuda::DeviceBuffer offsets, row_ptr, token, coef;
  std::int64_t slots = 0;
  HalfPlan() {
    const std::int64_t per_head = kShape.tokens / 2;
    slots = per_head * kShape.kv_heads;
    std::vector<std::int64_t> off, rp, tok;
    for (int h = 0; h <= kShape.kv_heads; ++h) off.push_back(h * per_head);
    for (std::int64_t r = 0; r <= slots; ++r) rp.push_back(r);
    for (std::int64_t r = 0; r < slots; ++r) tok.push_back(2 * (r % per_head));
    offsets = cuda::DeviceBuffer::from(off);
    row_ptr = cuda::DeviceBuffer::from(rp);
    token = cuda::DeviceBuffer::from(tok);
    coef = cuda::DeviceBuffer::from(std::vector<float>(static_cast<std::size_t>(slots), 1.0f));
  }
  cuda::RaggedPlan plan() const {
    return {kShape.kv_heads, offsets.as<std::int64_t>(), row_ptr.as<std::int64_t>(), token.as<std::int64_t>(),
            coef.as<float>(), coef.as<float>(), nullptr, 10000.0};
  }
};

void BM_apply_ragged_plan_half(benchmark::State& state) {
  if (skip_without_device(state)) return;
  const Layers& L = layers();
  const HalfPlan p;
  const std::size_t bytes = static_cast<std::size_t>(p.slots * kShape.head_dim) * 2;
  cuda::DeviceBuffer ko(bytes), vo(bytes);
  const double ms = median_ms([&](int i) {
    const auto c = static_cast<std::size_t>(i % kCopies);
    cuda::apply_ragged_plan(p.plan(), p.slots, kDtype, L.k[c].get(), L.v[c].get(), kShape.tokens, kShape.head_dim, ko.get(), vo.get());
  }, kBatch);
  report(state, ms, 4.0 * static_cast<double>(bytes));  // read K, V rows; write K', V'
}

void BM_decode_attention_half(benchmark::State& state) {
  if (skip_without_device(state)) return;
  const Layers& L = layers();
  const HalfPlan p;
  cuda::DeviceBuffer q = cuda::DeviceBuffer::from(std::vector<float>(static_cast<std::size_t>(kShape.q_heads * kShape.head_dim), 0.1f));
  cuda::DeviceBuffer out(static_cast<std::size_t>(kShape.q_heads * kShape.head_dim) * sizeof(float));
  // The first half of each copy's K/V rows stands in for a compacted cache of `slots` rows.
  const double ms = median_ms([&](int i) {
    const auto c = static_cast<std::size_t>(i % kCopies);
    cuda::decode_attention(q.as<float>(), kShape.q_heads, kShape.kv_heads, kShape.head_dim, p.offsets.as<std::int64_t>(),
                           p.slots, kDtype, L.k[c].get(), L.v[c].get(), nullptr, out.as<float>());
  }, kBatch);
  report(state, ms, 2.0 * static_cast<double>(p.slots * kShape.head_dim) * 2);
}

void BM_top_k_mask_half(benchmark::State& state) {
  if (skip_without_device(state)) return;
  const int rows = kShape.kv_heads;
  std::vector<float> s(static_cast<std::size_t>(rows * kShape.tokens));
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> u;
  for (float& x : s) x = u(rng);
  const cuda::DeviceBuffer scores = cuda::DeviceBuffer::from(s);
  const cuda::DeviceBuffer k = cuda::DeviceBuffer::from(std::vector<std::int64_t>(static_cast<std::size_t>(rows), kShape.tokens / 2));
  cuda::DeviceBuffer kept(s.size());
  const double ms = median_ms([&](int) {
    cuda::top_k_mask(scores.as<float>(), nullptr, rows, kShape.tokens, k.as<std::int64_t>(), kept.as<std::uint8_t>());
  }, kBatch);
  report(state, ms, static_cast<double>(s.size()) * (4 * 9 + 1));  // 8 radix passes + the final pass read, one byte written
}

}  // namespace

BENCHMARK(BM_copy_limit)->UseManualTime()->Iterations(1);
BENCHMARK(BM_key_norm_scores)->UseManualTime()->Iterations(1);
BENCHMARK(BM_apply_ragged_plan_half)->UseManualTime()->Iterations(1);
BENCHMARK(BM_decode_attention_half)->UseManualTime()->Iterations(1);
BENCHMARK(BM_top_k_mask_half)->UseManualTime()->Iterations(1);
BENCHMARK(BM_window_scores)->UseManualTime()->Iterations(1);
BENCHMARK(BM_accumulated_attention)->UseManualTime()->Iterations(1);

BENCHMARK_MAIN();
