// Helpers of the kernel benchmark files (bench_kernels.cpp,
// bench_merge_kernels.cpp): dtype names, a scoped OpenMP thread count, rotating
// input copies and the benchmark layer's kernel shape.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "bench_common.hpp"
#include "kvscope/opt/cpu/storage.hpp"

namespace kvscope::bench {

using opt::cpu::bf16;
using opt::cpu::f16;
using opt::cpu::LayerShape;

template <class S>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<S, f16>) return DType::kF16;
  if constexpr (std::is_same_v<S, bf16>) return DType::kBF16;
  return DType::kF32;
}
template <class S>
const char* dtype_name() {
  return std::is_same_v<S, f16> ? "f16" : std::is_same_v<S, bf16> ? "bf16" : "f32";
}

/// Sets the OpenMP thread count for one benchmark, restoring it after.
struct Threads {
  int saved;
  explicit Threads(int n) : saved(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~Threads() { omp_set_num_threads(saved); }
};

/// `copies` back-to-back copies of n elements.
template <class S>
std::vector<S> replicate(const S* src, std::int64_t n, int copies) {
  std::vector<S> out(static_cast<std::size_t>(n) * static_cast<std::size_t>(copies));
  for (int c = 0; c < copies; ++c) std::copy(src, src + n, out.begin() + static_cast<std::ptrdiff_t>(c) * n);
  return out;
}

inline LayerShape layer_shape() {
  const Shape& s = shape();
  return {s.q_heads, s.kv_heads, s.head_dim, s.tokens};
}
/// Elements of one layer's K (or V): kv_heads * T * d.
inline std::int64_t kv_elems() {
  return static_cast<std::int64_t>(shape().kv_heads) * shape().tokens * shape().head_dim;
}

/// The thread counts a kernel is timed at: 1 and all of OpenMP's (just 1 on one core).
inline std::vector<int> thread_counts() {
  std::vector<int> t{1};
  if (omp_get_max_threads() > 1) t.push_back(omp_get_max_threads());
  return t;
}

/// A kernel benchmark run once per entry of `threads` (argument `threads`), in real-time ms.
inline benchmark::internal::Benchmark* register_threaded(const std::string& name, void (*fn)(benchmark::State&),
                                                         const std::vector<int>& threads) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), fn);
  b->ArgName("threads")->UseRealTime()->Unit(benchmark::kMillisecond);
  for (int t : threads) b->Arg(t);
  return b;
}

/// n seeded uniform scores in [0, 1) (no ties in practice).
inline std::vector<float> random_scores(std::int64_t n, std::uint64_t seed) {
  std::vector<float> s(static_cast<std::size_t>(n));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (float& x : s) x = u(rng);
  return s;
}

}  // namespace kvscope::bench
