#include "kvscope/opt/cpu/scores.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "instantiate.hpp"

namespace kvscope::opt::cpu {
namespace {

/// Rows [first, first + n) of head h of a [heads, tokens, d] buffer, as fp32.
template <class S>
std::vector<float> load_rows(const S* x, std::int64_t h, std::int64_t tokens, int d, std::int64_t first,
                             std::int64_t n) {
  std::vector<float> out(static_cast<std::size_t>(n * d));
  load_row(x + (h * tokens + first) * d, n * d, out.data());
  return out;
}

/// Dot products of four consecutive d-long rows of `q` with `k` (one pass over k).
void dot4(const float* q, const float* k, int d, float* out) {
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int i = 0; i < d; ++i) {
    a0 += q[i] * k[i];
    a1 += q[d + i] * k[i];
    a2 += q[2 * d + i] * k[i];
    a3 += q[3 * d + i] * k[i];
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
}

/// In place: row <- softmax(row) over its first `len` entries (max subtracted).
void softmax_prefix(float* row, std::int64_t len) {
  float m = -INFINITY;
  for (std::int64_t j = 0; j < len; ++j) m = std::max(m, row[j]);
  float sum = 0.0f;
  for (std::int64_t j = 0; j < len; ++j) {
    row[j] = std::exp(row[j] - m);
    sum += row[j];
  }
  const float inv = 1.0f / sum;
  for (std::int64_t j = 0; j < len; ++j) row[j] *= inv;
}

}  // namespace

template <class S>
void window_scores(const LayerShape& s, const S* q, const S* k, std::int64_t window, Reduce rows, float* out) {
  const std::int64_t T = s.tokens, w = std::clamp<std::int64_t>(window, 0, T);
  const int d = s.head_dim, G = s.group();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::fill(out, out + s.q_heads * T, 0.0f);
  if (w == 0) return;
  const std::int64_t R = G * w;  // every window query of the group
  std::vector<float> logits(static_cast<std::size_t>(R * T));
  for (int g = 0; g < s.kv_heads; ++g) {
    // The group's window queries, pre-scaled: row r = (q head g*G + r / w, query T - w + r % w).
    std::vector<float> Q(static_cast<std::size_t>(R * d));
    for (int i = 0; i < G; ++i) {
      const std::vector<float> qi = load_rows(q, g * G + i, T, d, T - w, w);
      for (std::size_t e = 0; e < qi.size(); ++e) Q[static_cast<std::size_t>(i * w * d) + e] = qi[e] * scale;
    }
    const S* kg = k + static_cast<std::int64_t>(g) * T * d;
    // One pass over K: each key row is converted once and meets every query row.
#pragma omp parallel
    {
      std::vector<float> kj(static_cast<std::size_t>(d));
#pragma omp for schedule(static)
      for (std::int64_t j = 0; j < T; ++j) {
        load_row(kg + j * d, d, kj.data());
        // Four query rows per pass over the key: the key stays in registers.
        std::int64_t r = 0;
        for (; r + 4 <= R; r += 4) {
          float dots[4];
          dot4(&Q[static_cast<std::size_t>(r * d)], kj.data(), d, dots);
          for (int u = 0; u < 4; ++u) {
            const std::int64_t t = T - w + (r + u) % w;  // the query's own token: it sees keys 0..t
            logits[static_cast<std::size_t>((r + u) * T + j)] = j <= t ? dots[u] : 0.0f;
          }
        }
        for (; r < R; ++r) {
          const std::int64_t t = T - w + r % w;
          logits[static_cast<std::size_t>(r * T + j)] = j <= t ? dot(&Q[static_cast<std::size_t>(r * d)], kj.data(), d) : 0.0f;
        }
      }
#pragma omp for schedule(static)
      for (std::int64_t r = 0; r < R; ++r) softmax_prefix(&logits[static_cast<std::size_t>(r * T)], T - w + r % w + 1);
#pragma omp for schedule(static)
      for (std::int64_t j = 0; j < T; ++j)
        for (int i = 0; i < G; ++i) {
          float acc = 0.0f;  // probabilities are >= 0: also the max identity
          for (std::int64_t r = i * w; r < (i + 1) * w; ++r) {
            const std::int64_t t = T - w + r % w;
            const float p = j <= t ? logits[static_cast<std::size_t>(r * T + j)] : 0.0f;
            acc = rows == Reduce::kMax ? std::max(acc, p) : acc + p;
          }
          out[(g * G + i) * T + j] = rows == Reduce::kMean ? acc / static_cast<float>(w) : acc;
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
  // Queries go four at a time through each key (dot4), then row by row into the sums.
#pragma omp parallel
  {
    std::vector<float> rows(static_cast<std::size_t>(4 * T)), q4(static_cast<std::size_t>(4 * d));
#pragma omp for schedule(dynamic, 1)
    for (int h = 0; h < s.q_heads; ++h) {
      const std::vector<float> K = load_rows(k, h / G, T, d, 0, T);
      float* acc = out + static_cast<std::int64_t>(h) * T;
      std::fill(acc, acc + T, 0.0f);
      for (std::int64_t t0 = 0; t0 < T; t0 += 4) {
        const std::int64_t n = std::min<std::int64_t>(4, T - t0);
        load_row(q + (static_cast<std::int64_t>(h) * T + t0) * d, n * d, q4.data());
        for (std::int64_t e = 0; e < n * d; ++e) q4[static_cast<std::size_t>(e)] *= scale;
        std::fill(q4.begin() + n * d, q4.end(), 0.0f);
        for (std::int64_t j = 0; j < t0 + n; ++j) {
          float dots[4];
          dot4(q4.data(), &K[static_cast<std::size_t>(j * d)], d, dots);
          for (int u = 0; u < 4; ++u) rows[static_cast<std::size_t>(u * T + j)] = dots[u];
        }
        for (std::int64_t u = 0; u < n; ++u) {
          float* row = &rows[static_cast<std::size_t>(u * T)];
          softmax_prefix(row, t0 + u + 1);  // query t0 + u sees keys 0..t0 + u
          for (std::int64_t j = 0; j <= t0 + u; ++j) acc[j] += row[j];
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
