// The fp32 FMA peak probe. This file alone is compiled with the kernels' ISA
// flags (-march=native): the others share Eigen types with libraries built
// without them, and Eigen's allocator alignment must agree across them.
#include <omp.h>

#include <algorithm>
#include <cstdint>

#if defined(__FMA__)  // -mavx512f implies it
#include <immintrin.h>
#endif

#include "bench_common.hpp"

namespace kvscope::bench {

/// fp32 FMA peak: 10 independent accumulators per thread, of the widest
/// vectors the build targets (enough to cover FMA latency x throughput on
/// current x86), flops = 2 per lane per FMA.
double measure_peak_flops() {
  constexpr std::int64_t kIters = 20'000'000;
  double flops = 0, best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    int threads = 1;
    const double s = seconds([&] {
#pragma omp parallel
      {
#pragma omp single
        threads = omp_get_num_threads();
#if defined(__AVX512F__)
        // Sixteen lanes where the machine has them: the Intel VM of runs
        // 12-18 issues two zmm FMAs a cycle, twice the flops of the 8-wide
        // loop below, and the kernels' GEMM tiles and decode use zmm.
        __m512 a[10];
        const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
        for (int i = 0; i < 10; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i + omp_get_thread_num()));
        for (std::int64_t it = 0; it < kIters; ++it)
          for (int i = 0; i < 10; ++i) a[i] = _mm512_fmadd_ps(a[i], m, c);
        __m512 sum = a[0];
        for (int i = 1; i < 10; ++i) sum = _mm512_add_ps(sum, a[i]);
        float out[16];
        _mm512_storeu_ps(out, sum);
        benchmark::DoNotOptimize(out[0]);
#elif defined(__FMA__)
        __m256 a[10];
        const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
        for (int i = 0; i < 10; ++i) a[i] = _mm256_set1_ps(static_cast<float>(i + omp_get_thread_num()));
        for (std::int64_t it = 0; it < kIters; ++it)
          for (int i = 0; i < 10; ++i) a[i] = _mm256_fmadd_ps(a[i], m, c);
        __m256 sum = a[0];
        for (int i = 1; i < 10; ++i) sum = _mm256_add_ps(sum, a[i]);
        float out[8];
        _mm256_storeu_ps(out, sum);
        benchmark::DoNotOptimize(out[0]);
#else
        float a[80];
        for (int i = 0; i < 80; ++i) a[i] = static_cast<float>(i);
        for (std::int64_t it = 0; it < kIters; ++it)
#pragma omp simd
          for (int i = 0; i < 80; ++i) a[i] = a[i] * 0.999999f + 1e-7f;
        benchmark::DoNotOptimize(a[0]);
#endif
      }
    });
#if defined(__AVX512F__)
    constexpr double kLanesPerIter = 160.0;  // 10 accumulators x 16 lanes
#else
    constexpr double kLanesPerIter = 80.0;
#endif
    flops = 2.0 * kLanesPerIter * static_cast<double>(kIters) * threads;
    best = std::max(best, flops / s);
  }
  return best;
}

}  // namespace kvscope::bench
