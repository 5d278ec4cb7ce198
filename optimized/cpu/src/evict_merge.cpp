#include "kvscope/opt/cpu/evict_merge.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "qk_blocks.hpp"
#include "simd.hpp"
#include "instantiate.hpp"
#include "kvscope/core/kernel_math.hpp"

namespace kvscope::opt::cpu {
namespace {

/// Row x (d values) as a unit vector in fp32, scaled by a power of two first
/// (exact) so squares of tiny or huge rows neither underflow nor overflow.
/// Returns false (and zeros) for a zero row.
template <class S>
bool unit_row(const S* x, int d, float* u) {
  load_row(x, d, u);
  const float scale = std::ldexp(1.0f, -math::scale_exponent(detail::max_abs(u, d)));
  for (int i = 0; i < d; ++i) u[i] *= scale;
  const float n2 = detail::dot8(u, u, d);
  if (!(n2 > 0.0f)) {
    std::fill(u, u + d, 0.0f);
    return false;
  }
  const float inv = 1.0f / std::sqrt(n2);
  for (int i = 0; i < d; ++i) u[i] *= inv;
  return true;
}

}  // namespace

template <class S>
void centre_assignment(const S* k, const S* v, int head_dim, const std::int64_t* rest, std::int64_t n_rest,
                       const std::int64_t* centres, std::int64_t n_centres, const char* can_take, bool keys_only,
                       float tau, float* best, float* second, std::int64_t* centre, float* any) {
  const int d = head_dim;
  const auto C = static_cast<std::size_t>(n_centres);
  // The centres' unit rows, converted once.
  std::vector<float> uk(C * static_cast<std::size_t>(d)), uv(keys_only ? 0 : C * static_cast<std::size_t>(d));
  std::vector<char> nzk(C), nzv(C, 1);
#pragma omp parallel for schedule(static)
  for (std::int64_t c = 0; c < n_centres; ++c) {
    const auto cu = static_cast<std::size_t>(c);
    nzk[cu] = unit_row(k + centres[c] * d, d, &uk[cu * static_cast<std::size_t>(d)]);
    if (!keys_only) nzv[cu] = unit_row(v + centres[c] * d, d, &uv[cu * static_cast<std::size_t>(d)]);
  }
  // Rest items in fixed blocks: each block's unit rows against every centre's
  // is one GEMM per side (the block size never depends on the thread count).
  constexpr std::int64_t kRestBlock = 64;
  const std::int64_t blocks = (n_rest + kRestBlock - 1) / kRestBlock;
#pragma omp parallel
  {
    const auto B = static_cast<std::size_t>(kRestBlock);
    std::vector<float> xk(B * static_cast<std::size_t>(d)), xv(keys_only ? 0 : B * static_cast<std::size_t>(d));
    std::vector<float> sk(B * C), sv(keys_only ? 0 : B * C);
    std::vector<char> zk(B), zv(B, 0);
#pragma omp for schedule(static)
    for (std::int64_t blk = 0; blk < blocks; ++blk) {
      const std::int64_t i0 = blk * kRestBlock, m = std::min(kRestBlock, n_rest - i0);
      for (std::int64_t u = 0; u < m; ++u) {
        const auto uu = static_cast<std::size_t>(u);
        zk[uu] = !unit_row(k + rest[i0 + u] * d, d, &xk[uu * static_cast<std::size_t>(d)]);
        if (!keys_only) zv[uu] = !unit_row(v + rest[i0 + u] * d, d, &xv[uu * static_cast<std::size_t>(d)]);
      }
      detail::gemm_qkt(xk.data(), m, uk.data(), n_centres, d, sk.data(), n_centres);
      if (!keys_only) detail::gemm_qkt(xv.data(), m, uv.data(), n_centres, d, sv.data(), n_centres);
      for (std::int64_t u = 0; u < m; ++u) {
        const auto uu = static_cast<std::size_t>(u);
        const float* rk = sk.data() + uu * C;  // data(): C may be 0
        const float* rv = keys_only ? nullptr : sv.data() + uu * C;
        float b = -INFINITY, s2 = -INFINITY, a = -INFINITY;
        std::int64_t who = -1;
        for (std::size_t c = 0; c < C; ++c) {
          const float ck = zk[uu] || !nzk[c] ? 0.0f : rk[c];
          const float cv = keys_only ? 0.0f : zv[uu] || !nzv[c] ? 0.0f : rv[c];
          const float sim = math::ems_similarity(ck, cv, keys_only);
          a = std::max(a, sim);
          if (!can_take[c]) continue;
          if (sim > b) {
            s2 = b;
            b = sim;
            who = centres[c];
          } else if (sim > s2) {
            s2 = sim;
          }
        }
        const std::int64_t i = i0 + u;
        best[i] = b;
        second[i] = s2;
        any[i] = a;
        centre[i] = b < tau ? -1 : who;  // the zero class
      }
    }
  }
}

template <class S>
void cam_merge_probabilities(const LayerShape& s, const S* q, const S* k, std::int64_t sinks, std::int64_t budget,
                             std::int64_t width, bool denom_max, CamAttention attention, float* out) {
  const std::int64_t T = s.tokens;
  const int d = s.head_dim, G = s.group();
  std::fill(out, out + static_cast<std::int64_t>(s.kv_heads) * T, 0.0f);
  if (budget >= T || budget <= sinks || sinks < 0) return;  // nothing evicted (or refused by the caller)
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const std::int64_t recent = budget - sinks, wn = std::min(width, recent);
  // Query t's cache is [0, min(sinks, t + 1)) + [window_start(t), t]: the sink
  // columns and one contiguous key range per block of queries, so each block's
  // logits are two GEMMs; the slots of each query are then gathered from them.
  const auto window_start = [&](std::int64_t t) { return std::max(sinks, t + 1 - recent); };
  const auto cache_len = [&](std::int64_t t) { return std::min(t + 1, budget); };
  // Query t's cache slots as two runs of consecutive tokens, the sinks first,
  // then the window: f(first slot, first token, length) for each.
  const auto for_each_slot = [&](std::int64_t t, auto&& f) {
    const std::int64_t n_sinks = std::min(sinks, t + 1);
    f(std::int64_t{0}, std::int64_t{0}, n_sinks);
    f(n_sinks, window_start(t), cache_len(t) - n_sinks);
  };
  constexpr std::int64_t kBlock = 128;
  const std::int64_t max_cols = sinks + recent + kBlock;
  std::vector<float> rows(static_cast<std::size_t>(kBlock * budget)), abar(static_cast<std::size_t>(T));
  std::vector<float> K(static_cast<std::size_t>(T * d)), Q(static_cast<std::size_t>(G * kBlock * d)),
      L(static_cast<std::size_t>(G * kBlock * max_cols));
  for (int g = 0; g < s.kv_heads; ++g) {
    float* p = out + static_cast<std::int64_t>(g) * T;
    load_row(k + static_cast<std::int64_t>(g) * T * d, T * d, K.data());
    std::fill(abar.begin(), abar.end(), 0.0f);
    for (std::int64_t t0 = 0; t0 < T; t0 += kBlock) {
      const std::int64_t t1 = std::min(T, t0 + kBlock), nb = t1 - t0;
      if (attention != CamAttention::kDecode) {
        const std::int64_t ns = std::min(sinks, t1), lo = std::min(window_start(t0), t1), cols = ns + (t1 - lo);
        const std::int64_t R = G * nb, key_blocks = (t1 - lo + detail::kKeyBlock - 1) / detail::kKeyBlock;
        for (int i = 0; i < G; ++i)
          detail::load_rows(q, static_cast<std::int64_t>(g) * G + i, T, d, t0, nb, scale, &Q[static_cast<std::size_t>(i * nb * d)]);
#pragma omp parallel
        {
          // Item 0: the sink columns; item b > 0: window key block b - 1. Few
          // items of unequal size: dealt out dynamically (each writes its own columns).
#pragma omp for schedule(dynamic, 1)
          for (std::int64_t b = 0; b <= key_blocks; ++b) {
            if (b == 0) {
              if (ns > 0) detail::gemm_qkt(Q.data(), R, K.data(), ns, d, L.data(), cols);
              continue;
            }
            const std::int64_t j0 = lo + (b - 1) * detail::kKeyBlock, n = std::min(detail::kKeyBlock, t1 - j0);
            detail::gemm_qkt(Q.data(), R, &K[static_cast<std::size_t>(j0 * d)], n, d, &L[static_cast<std::size_t>(ns + j0 - lo)], cols);
          }
          // Each query row (group mean of its q heads' softmax over the cache)
          // by one thread, in place in L: the sink run and the window run.
#pragma omp for schedule(static)
          for (std::int64_t t = t0; t < t1; ++t) {
            float* row = &rows[static_cast<std::size_t>((t - t0) * budget)];
            const std::int64_t n = cache_len(t), n_sinks = std::min(sinks, t + 1), ws = window_start(t),
                               n_window = std::max<std::int64_t>(0, t + 1 - ws);
            std::fill(row, row + n, 0.0f);
            for (int i = 0; i < G; ++i) {
              float* sink_run = &L[static_cast<std::size_t>((i * nb + t - t0) * cols)];
              float* window_run = sink_run + ns + (ws - lo);
              const float m = std::max(detail::max_of(sink_run, n_sinks), detail::max_of(window_run, n_window));
              const float inv = 1.0f / (detail::exp_shifted_sum(sink_run, n_sinks, m) +
                                        detail::exp_shifted_sum(window_run, n_window, m));
              for (std::int64_t j = 0; j < n_sinks; ++j) row[j] += sink_run[j] * inv / static_cast<float>(G);
              float* row_window = row + n_sinks;
              for (std::int64_t j = 0; j < n_window; ++j) row_window[j] += window_run[j] * inv / static_cast<float>(G);
            }
          }
        }
      }
      // Serially, in query order: the pass of step t sees Ā of the queries before t.
      for (std::int64_t t = t0; t < t1; ++t) {
        if (t >= budget) {
          const std::int64_t e = t - recent;
          float denom = 0.0f;
          if (denom_max) {
            for (std::int64_t j = 0; j < sinks; ++j) denom = std::max(denom, abar[static_cast<std::size_t>(j)]);
            for (std::int64_t j = e; j <= t; ++j) denom = std::max(denom, abar[static_cast<std::size_t>(j)]);
          } else {
            for (std::int64_t j = e + 1; j <= e + wn; ++j) denom += abar[static_cast<std::size_t>(j)] / static_cast<float>(wn);
          }
          p[e] = math::cam_merge_probability(abar[static_cast<std::size_t>(e)], denom);
        }
        if (attention == CamAttention::kDecode) continue;
        if (attention == CamAttention::kStep && t > 0)
          for_each_slot(t - 1, [&](std::int64_t, std::int64_t first, std::int64_t n) {
            std::fill(&abar[static_cast<std::size_t>(first)], &abar[static_cast<std::size_t>(first + n)], 0.0f);
          });
        const float* row = &rows[static_cast<std::size_t>((t - t0) * budget)];
        for_each_slot(t, [&](std::int64_t slot, std::int64_t first, std::int64_t n) {
          float* a = &abar[static_cast<std::size_t>(first)];
          const float* r = row + slot;
#pragma omp simd
          for (std::int64_t j = 0; j < n; ++j) a[j] += r[j];
        });
      }
    }
  }
}

#define KVSCOPE_EVICT_MERGE(S)                                                                                       \
  template void centre_assignment<S>(const S*, const S*, int, const std::int64_t*, std::int64_t, const std::int64_t*, \
                                     std::int64_t, const char*, bool, float, float*, float*, std::int64_t*, float*);  \
  template void cam_merge_probabilities<S>(const LayerShape&, const S*, const S*, std::int64_t, std::int64_t,         \
                                           std::int64_t, bool, CamAttention, float*);
KVSCOPE_CPU_INSTANTIATE(KVSCOPE_EVICT_MERGE)

}  // namespace kvscope::opt::cpu
