#include "kvscope/opt/cpu/scores.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include <omp.h>

#include "qk_blocks.hpp"
#include "simd.hpp"
#include "instantiate.hpp"

namespace kvscope::opt::cpu {
using detail::gemm_qkt;
using detail::kKeyBlock;
using detail::dot8;
using detail::dot_qk;
using detail::load_rows;
#if KVSCOPE_CPU_AVX2
using detail::hsum;
#endif

namespace {

/// Prefill queries per block of accumulated_attention.
constexpr std::int64_t kQueryBlock = 64;
/// Logits (floats) of window_scores' passes per thread: 1 MiB, which stays in
/// the thread's L2 between the product, the softmax and the reduction (the
/// whole layer's 8 MiB at once went through the L3 three times).
constexpr std::int64_t kThreadLogitFloats = std::int64_t{1} << 18;
/// Window queries per group up to which window_scores streams the keys past
/// the queries (each key converted once, in registers or L1) instead of
/// converting and transposing key blocks for gemm_qkt's register tile: with so
/// few rows that costs more than the product, and the kernel is bound by
/// reading K.
constexpr std::int64_t kDirectRows = 8;

/// logits[r, j] (row stride ld) = Q[r] . k_j for R rows and n keys of storage,
/// each logit equal to dot_qk(Q[r], k_j). With R a multiple of four (GQA
/// groups of four and more), two keys by four rows at a time, converted in
/// registers; otherwise four keys at a time converted into kbuf (4 * d
/// floats) by two rows, in dot_qk's sixteen-lane chains where it has them.
template <class S>
void direct_qkt(const float* Q, std::int64_t R, const S* k, std::int64_t n, int d, float* kbuf, float* logits,
                std::int64_t ld) {
  std::int64_t j = 0;
#if KVSCOPE_CPU_AVX2
  if (d % 8 == 0 && R % 4 == 0) {
    for (; j + 2 <= n; j += 2) {
      prefetch(reinterpret_cast<const char*>(k + j * d) + kPrefetchAhead, 2 * d * sizeof(S));
      for (std::int64_t r = 0; r < R; r += 4) detail::qk_4x2(Q + r * d, k + j * d, k + (j + 1) * d, d, logits + r * ld + j, ld);
    }
  } else if (d % 8 == 0) {
#if KVSCOPE_CPU_AVX512
    // dot_qk's sixteen-lane chains; the eight-lane loop below then has no keys left.
    if (d % 16 == 0)
      for (; j + 4 <= n; j += 4) {
        prefetch(reinterpret_cast<const char*>(k + j * d) + kPrefetchAhead, 4 * d * sizeof(S));
        load_row(k + j * d, 4 * d, kbuf);
        for (std::int64_t r = 0; r < R; ++r) {
          const float* qr = Q + r * d;
          __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
          for (int c = 0; c < d; c += 16) {
            const __m512 x = _mm512_loadu_ps(qr + c);
            for (int u = 0; u < 4; ++u) a[u] = _mm512_fmadd_ps(x, _mm512_loadu_ps(kbuf + u * d + c), a[u]);
          }
          for (int u = 0; u < 4; ++u) logits[r * ld + j + u] = hsum(detail::halves_added(a[u]));
        }
      }
#endif
    for (; j + 4 <= n; j += 4) {
      prefetch(reinterpret_cast<const char*>(k + j * d) + kPrefetchAhead, 4 * d * sizeof(S));
      load_row(k + j * d, 4 * d, kbuf);
      const float *k0 = kbuf, *k1 = kbuf + d, *k2 = kbuf + 2 * d, *k3 = kbuf + 3 * d;
      std::int64_t r = 0;
      for (; r + 2 <= R; r += 2) {
        const float *qa = Q + r * d, *qb = qa + d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int c = 0; c < d; c += 8) {
          const __m256 x = _mm256_loadu_ps(qa + c), y = _mm256_loadu_ps(qb + c);
          const __m256 v0 = _mm256_loadu_ps(k0 + c), v1 = _mm256_loadu_ps(k1 + c), v2 = _mm256_loadu_ps(k2 + c),
                       v3 = _mm256_loadu_ps(k3 + c);
          a0 = _mm256_fmadd_ps(x, v0, a0), a1 = _mm256_fmadd_ps(x, v1, a1);
          a2 = _mm256_fmadd_ps(x, v2, a2), a3 = _mm256_fmadd_ps(x, v3, a3);
          b0 = _mm256_fmadd_ps(y, v0, b0), b1 = _mm256_fmadd_ps(y, v1, b1);
          b2 = _mm256_fmadd_ps(y, v2, b2), b3 = _mm256_fmadd_ps(y, v3, b3);
        }
        float* la = logits + r * ld + j;
        float* lb = la + ld;
        la[0] = hsum(a0), la[1] = hsum(a1), la[2] = hsum(a2), la[3] = hsum(a3);
        lb[0] = hsum(b0), lb[1] = hsum(b1), lb[2] = hsum(b2), lb[3] = hsum(b3);
      }
      for (; r < R; ++r)
        for (int u = 0; u < 4; ++u) logits[r * ld + j + u] = dot_qk(Q + r * d, kbuf + u * d, d);
    }
  }
#endif
  for (; j < n; ++j) {
    load_row(k + j * d, d, kbuf);
    for (std::int64_t r = 0; r < R; ++r) logits[r * ld + j] = dot_qk(Q + r * d, kbuf, d);
  }
}

}  // namespace

template <class S>
void window_scores(const LayerShape& s, const S* q, const S* k, std::int64_t window, Reduce rows, float* out) {
  const std::int64_t T = s.tokens, w = std::clamp<std::int64_t>(window, 0, T);
  const int d = s.head_dim, G = s.group();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  if (w == 0) {
    std::fill(out, out + s.q_heads * T, 0.0f);
    return;
  }
  const std::int64_t R = G * w;  // every window query of a group
  const std::int64_t blocks = (T + kKeyBlock - 1) / kKeyBlock;
  // kv heads per pass: a whole number per thread, as many as keep each
  // thread's logits within kThreadLogitFloats, so small windows (TOVA's one
  // query) share one parallel region. The static schedules below then give
  // each thread the same heads in all three loops: it reads back only the
  // logits it wrote, from its own cache. (Which heads share a pass changes no
  // value: each head's rows are computed alone.)
  const std::int64_t per_thread = std::max<std::int64_t>(1, kThreadLogitFloats / std::max<std::int64_t>(1, R * T));
  const int heads = static_cast<int>(std::clamp<std::int64_t>(per_thread * omp_get_max_threads(), 1, s.kv_heads));
  // Every logit a row reads is written first (the product covers every key):
  // the caller's thread keeps the buffer, so a call per layer neither zeroes
  // nor faults in megabytes again.
  float* logits = detail::thread_scratch(static_cast<std::size_t>(heads * R * T));
  std::vector<float> Q(static_cast<std::size_t>(heads * R * d)), inv(static_cast<std::size_t>(heads * R));  // 1 / each row's exp sum
  // Each row's max over each key block, taken while the block is in L1: the
  // softmax then needs no pass of its own for the row max (max is exact, so
  // the same value as one pass over the row).
  std::vector<float> block_max(static_cast<std::size_t>(heads * R * blocks));
  // Row r of a group = (q head r / w, token T - w + r % w), which sees keys 0..t.
  const auto last_key = [&](std::int64_t r) { return T - w + r % w; };
  for (int g0 = 0; g0 < s.kv_heads; g0 += heads) {
    const int nh = std::min(heads, s.kv_heads - g0);
    // The groups' window queries, pre-scaled.
    for (int e = 0; e < nh * G; ++e) load_rows(q, g0 * G + e, T, d, T - w, w, scale, &Q[static_cast<std::size_t>(e * w * d)]);
#pragma omp parallel
    {
      const bool direct = R <= kDirectRows;
      std::vector<float> kb(static_cast<std::size_t>(direct ? 4 * d : 0));
#pragma omp for schedule(static)
      for (std::int64_t item = 0; item < nh * blocks; ++item) {
        const std::int64_t gh = item / blocks, j0 = item % blocks * kKeyBlock, n = std::min(kKeyBlock, T - j0);
        const S* kj = k + ((g0 + gh) * T + j0) * d;
        const float* Qg = &Q[static_cast<std::size_t>(gh * R * d)];
        float* lg = &logits[static_cast<std::size_t>(gh * R * T + j0)];
        if (direct) {
          direct_qkt(Qg, R, kj, n, d, kb.data(), lg, T);
        } else {
          gemm_qkt(Qg, R, kj, n, d, lg, T);
        }
        for (std::int64_t r = 0; r < R; ++r)  // keys past the row's last are not its to see (-inf: none)
          block_max[static_cast<std::size_t>((gh * R + r) * blocks + j0 / kKeyBlock)] =
              detail::max_of(lg + r * T, std::min(n, last_key(r) + 1 - j0));
      }
      // Each row's exps; its normalisation is folded into the reduction below.
#pragma omp for schedule(static)
      for (std::int64_t r = 0; r < nh * R; ++r) {
        const float* bm = &block_max[static_cast<std::size_t>(r * blocks)];
        const float m = *std::max_element(bm, bm + blocks);
        inv[static_cast<std::size_t>(r)] =
            1.0f / detail::exp_shifted_sum(&logits[static_cast<std::size_t>(r * T)], last_key(r % R) + 1, m);
      }
      // Reduce each q head's w rows column block by column block, rows in order.
#pragma omp for schedule(static)
      for (std::int64_t item = 0; item < nh * G * blocks; ++item) {
        const std::int64_t e = item / blocks, j0 = item % blocks * kKeyBlock, j1 = std::min(T, j0 + kKeyBlock);
        float* acc = out + (g0 * G + e) * T;  // probabilities are >= 0: 0 is also the max identity
        // Zeroed here, block by block on every thread, not up front on one
        // (a serial 1 MiB fill for TOVA's 32 rows).
        std::fill(acc + j0, acc + j1, 0.0f);
        for (std::int64_t r = e * w; r < (e + 1) * w; ++r) {
          const float* p = &logits[static_cast<std::size_t>(r * T)];
          const float ir = inv[static_cast<std::size_t>(r)];
          const std::int64_t end = std::min(j1, last_key(r % R) + 1);
          if (rows == Reduce::kMax) {
            for (std::int64_t j = j0; j < end; ++j) acc[j] = std::max(acc[j], p[j] * ir);
          } else {
#pragma omp simd
            for (std::int64_t j = j0; j < end; ++j) acc[j] += p[j] * ir;
          }
        }
        if (rows == Reduce::kMean)
          for (std::int64_t j = j0; j < j1; ++j) acc[j] /= static_cast<float>(w);
      }
    }
  }
}

template <class S>
void accumulated_attention(const LayerShape& s, const S* q, const S* k, bool per_query, float* out) {
  const std::int64_t T = s.tokens;
  const int d = s.head_dim, G = s.group();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // One q head per thread: its column sums are added query by query in order.
  // Each block of queries meets all the keys it sees in one GEMM.
#pragma omp parallel
  {
    std::vector<float> K(static_cast<std::size_t>(T * d)), Qb(static_cast<std::size_t>(kQueryBlock * d)),
        P(static_cast<std::size_t>(kQueryBlock * T));
    int loaded = -1;  // the kv head whose keys are in K
#pragma omp for schedule(dynamic, 1)
    for (int h = 0; h < s.q_heads; ++h) {
      if (h / G != loaded) load_rows(k, loaded = h / G, T, d, 0, T, 1.0f, K.data());
      float* acc = out + static_cast<std::int64_t>(h) * T;
      std::fill(acc, acc + T, 0.0f);
      for (std::int64_t t0 = 0; t0 < T; t0 += kQueryBlock) {
        const std::int64_t n = std::min(kQueryBlock, T - t0), seen = t0 + n;
        load_rows(q, h, T, d, t0, n, scale, Qb.data());
        gemm_qkt(Qb.data(), n, K.data(), seen, d, P.data(), seen);
        for (std::int64_t u = 0; u < n; ++u) {
          float* row = &P[static_cast<std::size_t>(u * seen)];
          const std::int64_t len = t0 + u + 1;  // query t0 + u sees keys 0..t0 + u
          const float inv = detail::softmax_unnormalised(row, len);
#pragma omp simd
          for (std::int64_t j = 0; j < len; ++j) acc[j] += row[j] * inv;
        }
      }
      if (per_query)
        for (std::int64_t j = 0; j < T; ++j) acc[j] /= static_cast<float>(T - j);
    }
  }
}

template <class S>
void key_norm_scores(const LayerShape& s, const S* k, float* out) {
  const std::int64_t rows = static_cast<std::int64_t>(s.kv_heads) * s.tokens;
  const int d = s.head_dim;
#pragma omp parallel
  {
    std::vector<float> kj(static_cast<std::size_t>(d));
#pragma omp for schedule(static)
    for (std::int64_t r0 = 0; r0 < rows; r0 += 8) {
      std::int64_t r = r0;
      const std::int64_t end = std::min(rows, r0 + 8);
#if KVSCOPE_CPU_AVX2
      // d % 32 == 0 (every model's d): fused_dots' four chains a row, eight
      // rows at once in zmm under AVX-512, and one row at a time otherwise
      // (four chains are enough to hide the FMA latency).
      if (d % 32 == 0) {
#if KVSCOPE_CPU_AVX512
        for (; end - r >= 8; r += 8) {
          prefetch(reinterpret_cast<const char*>(k + r * d) + kPrefetchAhead, 8 * d * sizeof(S));
          const __m256 n2 = detail::sq_norms4_x8(k + r * d, d);
          _mm256_storeu_ps(out + r, _mm256_xor_ps(_mm256_set1_ps(-0.0f), _mm256_sqrt_ps(n2)));
        }
#endif
        for (; r < end; ++r) {
          prefetch(reinterpret_cast<const char*>(k + r * d) + kPrefetchAhead, d * sizeof(S));
          out[r] = -std::sqrt(detail::sq_norm4(k + r * d, d));
        }
      } else if (d % 8 == 0 && end - r0 == 8) {
        // Other multiples of eight: eight rows at once, converted in
        // registers: eight independent FMA chains, each dot8's chain of its
        // row, and one hsum8 (hsum's pairings), so every norm has dot8's bits.
        // A row at a time was one dependent chain of d / 8 FMAs per row: ~70
        // cycles a row, latency-bound rather than held by memory
        // (docs/performance.md, run 13).
        const S* kr = k + r0 * d;
        prefetch(reinterpret_cast<const char*>(kr) + kPrefetchAhead, 8 * d * sizeof(S));
        __m256 acc[8];
        for (__m256& a : acc) a = _mm256_setzero_ps();
        for (int c = 0; c < d; c += 8)
          for (int u = 0; u < 8; ++u) {
            const __m256 x = detail::load8(kr + u * d + c);
            acc[u] = _mm256_fmadd_ps(x, x, acc[u]);
          }
        _mm256_storeu_ps(out + r0, _mm256_xor_ps(_mm256_set1_ps(-0.0f), _mm256_sqrt_ps(detail::hsum8(acc))));
        r = end;
      }
#endif
      for (; r < end; ++r) {
        prefetch(reinterpret_cast<const char*>(k + r * d) + kPrefetchAhead, d * sizeof(S));
        load_row(k + r * d, d, kj.data());
        out[r] = -std::sqrt(dot8(kj.data(), kj.data(), d));
      }
    }
  }
}

void pool1d(const float* x, std::int64_t n, std::int64_t kernel, Pool pool, float* y) {
  if (pool == Pool::kNone || kernel <= 1) {
    std::copy(x, x + n, y);
    return;
  }
  const std::int64_t half = kernel / 2;
  const bool avg = pool == Pool::kAvg;
  // y[i] folds x[lo..hi] in index order. Near the ends the window is clipped;
  // in between every window is whole, so the same folds run offset by offset
  // across all interior i at once (vectorised, the same order per element).
  const auto edge = [&](std::int64_t i) {
    const std::int64_t lo = std::max<std::int64_t>(0, i - half), hi = std::min(n - 1, i + half);
    float acc = avg ? 0.0f : -INFINITY;
    for (std::int64_t j = lo; j <= hi; ++j) acc = avg ? acc + x[j] : std::max(acc, x[j]);
    y[i] = avg ? acc / static_cast<float>(kernel) : acc;
  };
  const std::int64_t a = std::min(half, n), b = std::max(a, n - half);  // interior [a, b)
  for (std::int64_t i = 0; i < a; ++i) edge(i);
  std::fill(y + a, y + b, avg ? 0.0f : -INFINITY);
  for (std::int64_t o = -half; o <= half; ++o) {
    if (avg) {
#pragma omp simd
      for (std::int64_t i = a; i < b; ++i) y[i] += x[i + o];
    } else {
#pragma omp simd
      for (std::int64_t i = a; i < b; ++i) y[i] = std::max(y[i], x[i + o]);
    }
  }
  if (avg)
    for (std::int64_t i = a; i < b; ++i) y[i] /= static_cast<float>(kernel);
  for (std::int64_t i = b; i < n; ++i) edge(i);
}

void pool1d_rows(const float* x, std::int64_t x_stride, std::int64_t rows, std::int64_t n, std::int64_t kernel, Pool pool,
                 float* y, std::int64_t y_stride) {
#pragma omp parallel for schedule(static) if (rows * n >= (1 << 16))
  for (std::int64_t r = 0; r < rows; ++r) pool1d(x + r * x_stride, n, kernel, pool, y + r * y_stride);
}

void group_reduce(const float* in, int q_heads, int kv_heads, std::int64_t n, Reduce r, float* out) {
  const int G = q_heads / kv_heads;
  // (kv head, block of columns) items on the threads, so one kv head (TOVA's
  // mean over every q head) is split too; each output element is still
  // reduced by one thread in i order. Small inputs stay serial, not worth a
  // parallel region.
  constexpr std::int64_t kColumns = 2048;
  const std::int64_t blocks = (n + kColumns - 1) / kColumns;
#pragma omp parallel for schedule(static) if (static_cast<std::int64_t>(q_heads) * n >= (1 << 16))
  for (std::int64_t item = 0; item < kv_heads * blocks; ++item) {
    const std::int64_t g = item / blocks, j0 = item % blocks * kColumns, j1 = std::min(n, j0 + kColumns);
    float* o = out + g * n;
    std::copy(in + g * G * n + j0, in + g * G * n + j1, o + j0);
    for (int i = 1; i < G; ++i) {
      const float* x = in + (g * G + i) * n;
      for (std::int64_t j = j0; j < j1; ++j) o[j] = r == Reduce::kMax ? std::max(o[j], x[j]) : o[j] + x[j];
    }
    if (r == Reduce::kMean)
      for (std::int64_t j = j0; j < j1; ++j) o[j] /= static_cast<float>(G);
  }
}

#define KVSCOPE_SCORES(S)                                                                                      \
  template void window_scores<S>(const LayerShape&, const S*, const S*, std::int64_t, Reduce, float*);          \
  template void accumulated_attention<S>(const LayerShape&, const S*, const S*, bool, float*);                 \
  template void key_norm_scores<S>(const LayerShape&, const S*, float*);
KVSCOPE_CPU_INSTANTIATE(KVSCOPE_SCORES)

}  // namespace kvscope::opt::cpu
