#include "kvscope/opt/cpu/scores.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "qk_blocks.hpp"
#include "instantiate.hpp"

namespace kvscope::opt::cpu {
using detail::gemm_qkt;
using detail::kKeyBlock;
using detail::load_rows;

namespace {

/// Prefill queries per block of accumulated_attention.
constexpr std::int64_t kQueryBlock = 64;
/// Logits (floats) window_scores keeps at once: 8 MiB, well inside the L3.
constexpr std::int64_t kLogitFloats = std::int64_t{2} << 20;

}  // namespace

template <class S>
void window_scores(const LayerShape& s, const S* q, const S* k, std::int64_t window, Reduce rows, float* out) {
  const std::int64_t T = s.tokens, w = std::clamp<std::int64_t>(window, 0, T);
  const int d = s.head_dim, G = s.group();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::fill(out, out + s.q_heads * T, 0.0f);
  if (w == 0) return;
  const std::int64_t R = G * w;  // every window query of a group
  const std::int64_t blocks = (T + kKeyBlock - 1) / kKeyBlock;
  // kv heads per pass: as many as keep their logits within kLogitFloats (in
  // cache), so small windows (TOVA's one query) share one parallel region.
  const int heads = static_cast<int>(std::clamp<std::int64_t>(kLogitFloats / std::max<std::int64_t>(1, R * T), 1, s.kv_heads));
  std::vector<float> logits(static_cast<std::size_t>(heads * R * T)), Q(static_cast<std::size_t>(heads * R * d));
  // Row r of a group = (q head r / w, token T - w + r % w), which sees keys 0..t.
  const auto last_key = [&](std::int64_t r) { return T - w + r % w; };
  for (int g0 = 0; g0 < s.kv_heads; g0 += heads) {
    const int nh = std::min(heads, s.kv_heads - g0);
    // The groups' window queries, pre-scaled.
    for (int e = 0; e < nh * G; ++e) load_rows(q, g0 * G + e, T, d, T - w, w, scale, &Q[static_cast<std::size_t>(e * w * d)]);
#pragma omp parallel
    {
      std::vector<float> kb(static_cast<std::size_t>(kKeyBlock * d));
#pragma omp for schedule(static)
      for (std::int64_t item = 0; item < nh * blocks; ++item) {
        const std::int64_t gh = item / blocks, j0 = item % blocks * kKeyBlock, n = std::min(kKeyBlock, T - j0);
        load_row(k + ((g0 + gh) * T + j0) * d, n * d, kb.data());
        gemm_qkt(&Q[static_cast<std::size_t>(gh * R * d)], R, kb.data(), n, d, &logits[static_cast<std::size_t>(gh * R * T + j0)], T);
      }
#pragma omp for schedule(static)
      for (std::int64_t r = 0; r < nh * R; ++r)
        detail::softmax_inplace(&logits[static_cast<std::size_t>(r * T)], last_key(r % R) + 1);
      // Reduce each q head's w rows column block by column block, rows in order.
#pragma omp for schedule(static)
      for (std::int64_t item = 0; item < nh * G * blocks; ++item) {
        const std::int64_t e = item / blocks, j0 = item % blocks * kKeyBlock, j1 = std::min(T, j0 + kKeyBlock);
        float* acc = out + (g0 * G + e) * T;  // probabilities are >= 0: 0 is also the max identity
        for (std::int64_t r = e * w; r < (e + 1) * w; ++r) {
          const float* p = &logits[static_cast<std::size_t>(r * T)];
          const std::int64_t end = std::min(j1, last_key(r % R) + 1);
          if (rows == Reduce::kMax) {
            for (std::int64_t j = j0; j < end; ++j) acc[j] = std::max(acc[j], p[j]);
          } else {
#pragma omp simd
            for (std::int64_t j = j0; j < end; ++j) acc[j] += p[j];
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
          detail::softmax_inplace(row, len);
#pragma omp simd
          for (std::int64_t j = 0; j < len; ++j) acc[j] += row[j];
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
    for (std::int64_t r = 0; r < rows; ++r) {
      load_row(k + r * d, d, kj.data());
      out[r] = -std::sqrt(dot(kj.data(), kj.data(), d));
    }
  }
}

void pool1d(const float* x, std::int64_t n, std::int64_t kernel, Pool pool, float* y) {
  if (pool == Pool::kNone || kernel <= 1) {
    std::copy(x, x + n, y);
    return;
  }
  const std::int64_t half = kernel / 2;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t lo = std::max<std::int64_t>(0, i - half), hi = std::min(n - 1, i + half);
    float acc = pool == Pool::kAvg ? 0.0f : -INFINITY;
    for (std::int64_t j = lo; j <= hi; ++j) acc = pool == Pool::kAvg ? acc + x[j] : std::max(acc, x[j]);
    y[i] = pool == Pool::kAvg ? acc / static_cast<float>(kernel) : acc;
  }
}

void group_reduce(const float* in, int q_heads, int kv_heads, std::int64_t n, Reduce r, float* out) {
  const int G = q_heads / kv_heads;
  for (int g = 0; g < kv_heads; ++g) {
    float* o = out + static_cast<std::int64_t>(g) * n;
    std::copy(in + static_cast<std::int64_t>(g) * G * n, in + (static_cast<std::int64_t>(g) * G + 1) * n, o);
    for (int i = 1; i < G; ++i) {
      const float* x = in + (static_cast<std::int64_t>(g) * G + i) * n;
      for (std::int64_t j = 0; j < n; ++j) o[j] = r == Reduce::kMax ? std::max(o[j], x[j]) : o[j] + x[j];
    }
    if (r == Reduce::kMean)
      for (std::int64_t j = 0; j < n; ++j) o[j] /= static_cast<float>(G);
  }
}

#define KVSCOPE_SCORES(S)                                                                                      \
  template void window_scores<S>(const LayerShape&, const S*, const S*, std::int64_t, Reduce, float*);          \
  template void accumulated_attention<S>(const LayerShape&, const S*, const S*, bool, float*);                 \
  template void key_norm_scores<S>(const LayerShape&, const S*, float*);
KVSCOPE_CPU_INSTANTIATE(KVSCOPE_SCORES)

}  // namespace kvscope::opt::cpu
