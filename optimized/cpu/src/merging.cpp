#include "kvscope/opt/cpu/merging.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "qk_blocks.hpp"
#include "simd.hpp"
#include "instantiate.hpp"
#include "kvscope/core/kernel_math.hpp"

namespace kvscope::opt::cpu {
namespace {

/// sum_c (x_c f1 f2)^2 of one row: one eight-lane FMA chain and a fixed
/// horizontal sum under AVX2 (d % 8 == 0), else a sequential sum.
float scaled_sq_norm(const float* x, int d, float f1, float f2) {
#if KVSCOPE_CPU_AVX2
  if (d % 8 == 0) {
    const __m256 g1 = _mm256_set1_ps(f1), g2 = _mm256_set1_ps(f2);
    __m256 acc = _mm256_setzero_ps();
    for (int c = 0; c < d; c += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + c), g1), g2);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    return detail::hsum(acc);
  }
#endif
  float acc = 0.0f;
  for (int c = 0; c < d; ++c) {
    const float v = x[c] * f1 * f2;
    acc += v * v;
  }
  return acc;
}

/// out[i] = scaled_sq_norm(row i) for the m rows of x ([m, d]), four rows at
/// a time under AVX2: four independent chains, each row's value unchanged.
void scaled_sq_norms(const float* x, std::int64_t m, int d, float f1, float f2, float* out) {
  std::int64_t i = 0;
#if KVSCOPE_CPU_AVX2
  if (d % 8 == 0) {
    const __m256 g1 = _mm256_set1_ps(f1), g2 = _mm256_set1_ps(f2);
    for (; i + 4 <= m; i += 4) {
      const float* r = x + i * d;
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int c = 0; c < d; c += 8)
        for (int u = 0; u < 4; ++u) {
          const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(r + u * d + c), g1), g2);
          acc[u] = _mm256_fmadd_ps(v, v, acc[u]);
        }
      for (int u = 0; u < 4; ++u) out[i + u] = detail::hsum(acc[u]);
    }
  }
#endif
  for (; i < m; ++i) out[i] = scaled_sq_norm(x + i * d, d, f1, f2);
}

#if KVSCOPE_CPU_AVX2
/// The eight-lane difference kp - k_i of columns [c, c + 8) of two storage
/// rows, both converted in registers, times 2^h1 * 2^h2 when scaled (in
/// scaled_sq_norm's order).
template <bool kScaled, class S>
__m256 scaled_difference(const S* kp, const S* row, int c, __m256 g1, __m256 g2) {
  const __m256 v = _mm256_sub_ps(detail::load8(kp + c), detail::load8(row + c));
  if constexpr (kScaled) return _mm256_mul_ps(_mm256_mul_ps(v, g1), g2);
  return v;
}

#if KVSCOPE_CPU_AVX512
KVSCOPE_AVX512_WARNINGS_OFF
/// scaled_sq_distances for d = 16 * kBlocks with the pivot converted once
/// into registers, sixteen lanes at a time: the blocks hold the four chains
/// in pairs ([x0 | x1], [x2 | x3]), in the same order, so the same bits.
template <int kBlocks, bool kScaled, bool kRange, class S>
void distances_in_registers(const S* kp, const S* k, std::int64_t m, float f1, float f2, float* dist2,
                            detail::AbsRange* ranges) {
  constexpr int d = 16 * kBlocks;
  const __m512 g1 = _mm512_set1_ps(f1), g2 = _mm512_set1_ps(f2);
  __m512 p[kBlocks];
  for (int b = 0; b < kBlocks; ++b) p[b] = detail::load16(kp + 16 * b);
  detail::AbsRange16 range;
  for (std::int64_t i = 0; i < m; ++i) {
    const S* r = k + i * d;
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int b = 0; b < kBlocks; ++b) {
      __m512 v = _mm512_sub_ps(p[b], detail::load16(r + 16 * b));
      if constexpr (kScaled) v = _mm512_mul_ps(_mm512_mul_ps(v, g1), g2);
      acc[b % 2] = _mm512_fmadd_ps(v, v, acc[b % 2]);
      if constexpr (kRange) range.add(v);
    }
    dist2[i] = detail::sum_of_chains(acc[0], acc[1]);
  }
  if constexpr (kRange) ranges[0].add(range.fold());
}
KVSCOPE_AVX512_WARNINGS_ON
#endif

/// dist2[i] = |(kp - k_i) 2^h1 2^h2|^2 for the m rows of storage at k against
/// the pivot row kp (storage too), the differences taken in registers (never
/// stored). Block j of eight columns goes to chain j % 4, the chains summed as
/// (x0 + x1) + (x2 + x3) and then across lanes (fused_dots' order): four
/// short chains a row, where one chain of d / 8 FMAs left the two- and
/// three-token runs that dominate latency-bound. A fixed order, so the same
/// bits on every run and thread count, and a power-of-two scale commutes with
/// it. With kRange, also the range of the differences: the union of
/// ranges[0..3] (the AVX2 loop puts row i's in ranges[i % 4]).
template <bool kScaled, bool kRange = false, class S>
void scaled_sq_distances(const S* kp, const S* k, std::int64_t m, int d, float f1, float f2, float* dist2,
                         detail::AbsRange* ranges = nullptr) {
#if KVSCOPE_CPU_AVX512
  switch (d) {
    case 32: return distances_in_registers<2, kScaled, kRange>(kp, k, m, f1, f2, dist2, ranges);
    case 64: return distances_in_registers<4, kScaled, kRange>(kp, k, m, f1, f2, dist2, ranges);
    case 128: return distances_in_registers<8, kScaled, kRange>(kp, k, m, f1, f2, dist2, ranges);
    default: break;
  }
#endif
  const __m256 g1 = _mm256_set1_ps(f1), g2 = _mm256_set1_ps(f2);
  for (std::int64_t i = 0; i < m; ++i) {
    const S* r = k + i * d;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int c = 0; c < d; c += 8) {
      const __m256 v = scaled_difference<kScaled>(kp, r, c, g1, g2);
      acc[(c / 8) % 4] = _mm256_fmadd_ps(v, v, acc[(c / 8) % 4]);
      if constexpr (kRange) ranges[i % 4].add(v);
    }
    dist2[i] = detail::hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  }
}
#endif

/// dist2[i] = |kp - k_i|^2 * 4^-ex for the m key rows of storage at k, with
/// `ex` the scale exponent of the largest |difference| (0 for fp16, see the
/// caller), the differences never stored: fp16 in one pass, bf16 and fp32 in
/// one or two over the run's rows (below).
/// Under AVX2 with d % 8 == 0; else false and nothing done.
template <class S>
bool squared_distances_from_storage(const S* kp, const S* k, std::int64_t m, int d, float* dist2, int& ex) {
  ex = 0;
#if KVSCOPE_CPU_AVX2
  if (d % 8 != 0) return false;
  if constexpr (std::is_same_v<S, f16>) {
    scaled_sq_distances<false>(kp, k, m, d, 1.0f, 1.0f, dist2);
  } else {
    // One pass in the common case: the unscaled squares and the range of
    // the differences (fp32 numbers, so the fp32 floor). Where the scale
    // changes no bit, the scaled distances are the unscaled ones times
    // 4^-ex, bit for bit; otherwise the scaled squares in a second pass.
    detail::AbsRange range[4];
    scaled_sq_distances<false, true>(kp, k, m, d, 1.0f, 1.0f, dist2, range);
    for (int u = 1; u < 4; ++u) range[0].add(range[u]);
    const float lo = range[0].low();
    ex = math::scale_exponent(range[0].high());
    if (detail::rescale_changes_no_bit(ex, lo, 0x1p-40f)) {
      const float unscale = detail::pow2(-2 * ex);  // exact: no distance is subnormal
      for (std::int64_t i = 0; i < m; ++i) dist2[i] *= unscale;
      return true;
    }
    const int h1 = -ex / 2, h2 = -ex - h1;
    scaled_sq_distances<true>(kp, k, m, d, detail::pow2(h1), detail::pow2(h2), dist2);
  }
  return true;
#else
  (void)kp, (void)k, (void)m, (void)d, (void)dist2;
  return false;
#endif
}

}  // namespace

void merge_runs(std::int64_t tokens, const char* merge, const float* score, std::vector<std::int64_t>& begin,
                std::vector<std::int64_t>& pivot) {
  begin.clear();
  pivot.clear();
  for (std::int64_t b = 0; b < tokens;) {
    // The run ends after the first edge from b on that does not merge, found
    // by memchr (glibc's wide compares): a branch per token on the flags
    // mispredicted at every run's end.
    const void* stop = b + 1 < tokens ? std::memchr(merge + b, 0, static_cast<std::size_t>(tokens - 1 - b)) : nullptr;
    const std::int64_t e = stop ? static_cast<const char*>(stop) - merge + 1 : tokens;
    std::int64_t p = b;
    for (std::int64_t j = b + 1; j < e; ++j)
      if (score[j] > score[p]) p = j;
    begin.push_back(b);
    pivot.push_back(p);
    b = e;
  }
  begin.push_back(tokens);
}

void run_coefficients(const float* w, const std::int64_t* begin, std::int64_t runs, bool scaled_values,
                      double* coef_k, double* coef_v, std::int64_t* count) {
  for (std::int64_t s = 0; s < runs; ++s) {
    const std::int64_t b = begin[s], e = begin[s + 1];
    // Four partial sums in a fixed order: one chain of dependent double adds
    // per token was the plan fill's time, with a division per token.
    double part[4] = {0.0, 0.0, 0.0, 0.0};
    std::int64_t j = b;
    for (; j + 4 <= e; j += 4)
      for (int u = 0; u < 4; ++u) part[u] += static_cast<double>(w[j + u]);
    for (; j < e; ++j) part[0] += static_cast<double>(w[j]);
    const double inv = 1.0 / ((part[0] + part[1]) + (part[2] + part[3]));
    const double scale = scaled_values ? static_cast<double>(e - b) : 1.0;
    for (j = b; j < e; ++j) {
      coef_k[j] = static_cast<double>(w[j]) * inv;
      coef_v[j] = scale * coef_k[j];
    }
    count[s] = e - b;
  }
}

template <class S>
void gaussian_merge_weights(const S* k_head, std::int64_t tokens, int head_dim, const std::int64_t* begin,
                            const std::int64_t* pivot, std::int64_t runs, SigmaMode mode, float sigma, float* w,
                            bool keys_cached) {
  const int d = head_dim;
  constexpr float kSqrt2 = 1.41421356237309515f;
#pragma omp parallel
  {
    std::vector<float> kp(static_cast<std::size_t>(d)), diff, dist2;
    // Runs differ in length: dealt out in small batches, not halves.
#pragma omp for schedule(dynamic, 64)
    for (std::int64_t s = 0; s < runs; ++s) {
      const std::int64_t b = begin[s], e = begin[s + 1], m = e - b;
      // The stream of key rows kPrefetchAhead ahead, hinted for every run
      // (one-token runs too, whose rows are not read), so no run starts cold,
      // unless they are in cache already.
      if (!keys_cached)
        prefetch(reinterpret_cast<const char*>(k_head + b * d) + kPrefetchAhead, static_cast<std::size_t>(m * d) * sizeof(S));
      if (m == 1) {
        w[b] = 1.0f;
        continue;
      }
      dist2.resize(static_cast<std::size_t>(m));
      // Scale exponent ex of the largest difference k_p - k_i: |k_p - k_i|^2
      // of tiny keys would underflow in fp32 (the reference's double does
      // not). fp16 needs none: its differences are 0 or >= 2^-24, their
      // squares and sums stay normal, and a power-of-two scale commutes with
      // every rounding, so the weights are the same bits without it; its
      // distances come straight from storage, the differences never stored.
      int ex = 0;
      const bool direct = squared_distances_from_storage(k_head + pivot[s] * d, k_head + b * d, m, d, dist2.data(), ex);
      if (!direct) {
        load_row(k_head + pivot[s] * d, d, kp.data());
        diff.resize(static_cast<std::size_t>(m * d));  // each key row converted once
        for (std::int64_t i = 0; i < m; ++i)
          for (int c = 0; c < d; ++c)
            diff[static_cast<std::size_t>(i * d + c)] = kp[static_cast<std::size_t>(c)] - to_f32(k_head[(b + i) * d + c]);
        if constexpr (!std::is_same_v<S, f16>) ex = math::scale_exponent(detail::max_abs(diff.data(), static_cast<int>(m * d)));
      }
      const int h1 = -ex / 2, h2 = -ex - h1;
      const float f1 = detail::pow2(h1), f2 = detail::pow2(h2);  // 2^-ex in two exact steps (|h| <= 74)
      if (!direct) scaled_sq_norms(diff.data(), m, d, f1, f2, dist2.data());  // |k_p - k_i|^2 * 4^-ex
      const float sqrt2m = kSqrt2 * static_cast<float>(m);
      float sig = 0.0f;  // in the scaled units
      switch (mode) {
        case SigmaMode::kMeanDistance: {
          float sum = 0.0f;
          for (float x : dist2) sum += std::sqrt(x);
          sig = sum / sqrt2m;
          break;
        }
        case SigmaMode::kFixed:
          sig = sigma * f1 * f2;
          break;
        case SigmaMode::kLiteral: {
          // sigma = sum_i g_i(sigma) / (sqrt2 |S|), iterated down from its bound 1/sqrt2.
          float x = 1.0f / kSqrt2;
          for (int it = 0; it < 500; ++it) {
            float sum = 0.0f;
            for (float d2 : dist2) sum += math::gaussian_weight(d2, x * f1 * f2);
            const float next = sum / sqrt2m;
            const bool done = std::abs(next - x) <= 1e-15f * x;
            x = next;
            if (done) break;
          }
          sig = x * f1 * f2;
          break;
        }
      }
      // g_i = math::gaussian_weight(dist2_i, sig): the same exponents, their
      // exps sixteen lanes at a time and summed in eight fixed lanes
      // (detail::exp_shifted_sum; glibc's vector expf, within an ulp of the
      // scalar one). A scalar expf per merged token was 7% of KVMerger's prefill.
      float* g = w + b;
      float total = static_cast<float>(m);
      if (sig > 0.0f) {
        // The pivot's exponent is 0 (exp 1) even where 2 sig^2 underflows.
        for (std::int64_t i = 0; i < m; ++i) {
          const float d2 = dist2[static_cast<std::size_t>(i)];
          g[i] = d2 == 0.0f ? 0.0f : math::gaussian_exponent(d2, sig);
        }
        total = detail::exp_shifted_sum(g, m, 0.0f);
      } else {
        std::fill(g, g + m, 1.0f);  // every key at the pivot
      }
      for (std::int64_t i = 0; i < m; ++i) g[i] /= total;
    }
  }
  (void)tokens;
}

template <class S>
void group_block_logits(const LayerShape& s, const S* q, const S* k, const std::int64_t* keys, std::int64_t n_keys,
                        int kv, std::int64_t t0, std::int64_t n, float* out) {
  const int d = s.head_dim, G = s.group();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> Q(static_cast<std::size_t>(G * n * d));
  for (int i = 0; i < G; ++i)
    detail::load_rows(q, static_cast<std::int64_t>(kv) * G + i, s.tokens, d, t0, n, scale, &Q[static_cast<std::size_t>(i * n * d)]);
  detail::gemm_qkt_rows(Q.data(), G * n, k + static_cast<std::int64_t>(kv) * s.tokens * d, keys, n_keys, d, out, n_keys);
}

void group_prefix_softmax(float* rows, std::int64_t head_stride, int group, std::int64_t len, Reduce r, float* out) {
  for (int i = 0; i < group; ++i) {
    float* x = rows + i * head_stride;
    // exp(x - max) in place (-inf -> 0), normalised as it is reduced.
    const float inv = detail::softmax_unnormalised(x, len);
    if (i == 0) {
      for (std::int64_t j = 0; j < len; ++j) out[j] = x[j] * inv;
    } else if (r == Reduce::kMax) {
      for (std::int64_t j = 0; j < len; ++j) out[j] = std::max(out[j], x[j] * inv);
    } else {
      for (std::int64_t j = 0; j < len; ++j) out[j] += x[j] * inv;
    }
  }
  if (r != Reduce::kMean) return;
  if ((group & (group - 1)) == 0) {  // x * 2^-k is x / 2^k exactly: a multiply instead of a divide
    const float inv_group = 1.0f / static_cast<float>(group);
    for (std::int64_t j = 0; j < len; ++j) out[j] *= inv_group;
  } else {
    for (std::int64_t j = 0; j < len; ++j) out[j] /= static_cast<float>(group);
  }
}

#define KVSCOPE_MERGING(S)                                                                                       \
  template void gaussian_merge_weights<S>(const S*, std::int64_t, int, const std::int64_t*, const std::int64_t*, \
                                          std::int64_t, SigmaMode, float, float*, bool);                         \
  template void group_block_logits<S>(const LayerShape&, const S*, const S*, const std::int64_t*, std::int64_t, int, \
                                      std::int64_t, std::int64_t, float*);
KVSCOPE_CPU_INSTANTIATE(KVSCOPE_MERGING)

}  // namespace kvscope::opt::cpu
