#include "qk_blocks.hpp"

#include <Eigen/Core>
#include <algorithm>

#if defined(__AVX2__)
#include <immintrin.h>
// glibc's libmvec: expf on eight lanes (x86_64 vector function ABI, AVX2).
extern "C" __m256 _ZGVdN8v_expf(__m256 x);
#endif
#include <cmath>

namespace kvscope::opt::cpu::detail {

void gemm_qkt(const float* Q, std::int64_t R, const float* K, std::int64_t n, int d, float* logits, std::int64_t ld) {
  namespace ei = Eigen::internal;
  using Index = Eigen::Index;
  for (std::int64_t r = 0; r < R; ++r) std::fill(logits + r * ld, logits + r * ld + n, 0.0f);
  if (R == 0 || n == 0 || d == 0) return;
  // C (row-major, stride ld) += Q (row-major, stride d) . K^T (K^T is column-major with stride d).
  ei::gemm_blocking_space<Eigen::RowMajor, float, float, Eigen::Dynamic, Eigen::Dynamic, Eigen::Dynamic, 1, false> blocking(
      static_cast<Index>(R), static_cast<Index>(n), static_cast<Index>(d), 1, true);
  ei::general_matrix_matrix_product<Index, float, Eigen::RowMajor, false, float, Eigen::ColMajor, false, Eigen::RowMajor,
                                    1>::run(static_cast<Index>(R), static_cast<Index>(n), static_cast<Index>(d), Q, d, K,
                                            d, logits, 1, static_cast<Index>(ld), 1.0f, blocking);
}

constexpr int kLanes = 8;

void exp_inplace(float* x, std::int64_t n) {
#if defined(__AVX2__)
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) _mm256_storeu_ps(x + i, _ZGVdN8v_expf(_mm256_loadu_ps(x + i)));
  if (i < n) {  // the tail through the same eight-lane function
    float tail[kLanes] = {};
    std::copy(x + i, x + n, tail);
    _mm256_storeu_ps(tail, _ZGVdN8v_expf(_mm256_loadu_ps(tail)));
    std::copy(tail, tail + (n - i), x + i);
  }
#else
  for (std::int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
#endif
}

/// max / sum with eight accumulators in a fixed order (vectorisable as
/// written; no reassociation is needed or allowed).
float max_of(const float* x, std::int64_t n) {
  float m[kLanes];
  std::fill(m, m + kLanes, -INFINITY);
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) m[l] = std::max(m[l], x[i + l]);
  for (; i < n; ++i) m[0] = std::max(m[0], x[i]);
  return *std::max_element(m, m + kLanes);
}

#if !defined(__AVX2__)
namespace {

float sum_of(const float* x, std::int64_t n) {
  float s[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) s[l] += x[i + l];
  for (; i < n; ++i) s[0] += x[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}
}  // namespace
#endif

float exp_shifted_sum(float* x, std::int64_t n, float m) {
  if (n <= 0) return 0.0f;
#if defined(__AVX2__)
  // x - m, exp and the eight lane sums in one pass: the same values and the
  // same sum order as the three passes (subtract, exp_inplace, sum_of).
  const __m256 vm = _mm256_set1_ps(m);
  __m256 lanes = _mm256_setzero_ps();
  std::int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const __m256 e = _ZGVdN8v_expf(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    _mm256_storeu_ps(x + i, e);
    lanes = _mm256_add_ps(lanes, e);
  }
  float s[kLanes];
  _mm256_storeu_ps(s, lanes);
  for (std::int64_t t = i; t < n; ++t) x[t] -= m;
  exp_inplace(x + i, n - i);
  for (; i < n; ++i) s[0] += x[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
#else
  for (std::int64_t i = 0; i < n; ++i) x[i] -= m;
  exp_inplace(x, n);
  return sum_of(x, n);
#endif
}

float softmax_unnormalised(float* x, std::int64_t len) {
  if (len <= 0) return 0.0f;
  return 1.0f / exp_shifted_sum(x, len, max_of(x, len));
}

void softmax_inplace(float* x, std::int64_t len) {
  const float inv = softmax_unnormalised(x, len);
  for (std::int64_t i = 0; i < len; ++i) x[i] *= inv;
}

}  // namespace kvscope::opt::cpu::detail
