// Score kernels (cpu counterparts: optimized/cpu/src/scores.cpp). The
// softmax-column scores (window, accumulated attention) are the two tiled
// passes of softmax_columns.cuh.
#include <cmath>

#include "common.cuh"
#include "softmax_columns.cuh"
#include "kvscope/opt/cuda/kernels.hpp"

namespace kvscope::opt::cuda {
namespace {

using detail::kBlock;
using detail::load;

/// Softmax rows first..first+R-1 of every q head, reduced per key into out [q_heads, T].
template <class S>
void softmax_columns(const LayerShape& s, const S* q, const S* k, std::int64_t first, int R, Reduce rows,
                     bool per_query, float* out, cudaStream_t stream) {
  const std::int64_t T = s.tokens;
  const int d = s.head_dim, G = s.group();
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  using detail::kTile;
  const std::int64_t n_rows = static_cast<std::int64_t>(s.q_heads) * R;
  // Splits of the causal key range: the last row (first + R - 1) sees keys 0..first + R - 1.
  const auto splits = static_cast<int>(detail::grid_for(first + R, kTile * detail::kSplitTiles));
  detail::Scratch<float> part(n_rows * 2 * splits, stream), mx(n_rows, stream), sm(n_rows, stream);
  const dim3 row_tiles(detail::grid_for(R, kTile), static_cast<unsigned>(s.q_heads), static_cast<unsigned>(splits));
  detail::softmax_row_stats<S><<<row_tiles, detail::kTileThreads, 0, stream>>>(q, k, T, d, G, first, R, scale,
                                                                               part.get());
  KVSCOPE_CUDA_LAUNCHED("softmax_row_stats");
  detail::softmax_row_merge<<<detail::grid_for(n_rows, kBlock), kBlock, 0, stream>>>(part.get(), splits, n_rows,
                                                                                     mx.get(), sm.get());
  KVSCOPE_CUDA_LAUNCHED("softmax_row_merge");
  const dim3 key_tiles(detail::grid_for(T, kTile), static_cast<unsigned>(s.q_heads));
  detail::softmax_column_reduce<S><<<key_tiles, detail::kTileThreads, 0, stream>>>(
      q, k, T, d, G, first, R, scale, mx.get(), sm.get(), rows, per_query, out);
  KVSCOPE_CUDA_LAUNCHED("softmax_column_reduce");
}

/// One warp per key row (kNormWarps rows per block): lanes read four
/// elements at a time (one vector load when `vec`), then an xor-butterfly sum.
/// (Four rows per warp with all loads issued first measured no faster.)
constexpr int kNormWarps = 8;
template <class S>
__global__ void key_norms(const S* k, std::int64_t rows, int d, bool vec, float* out) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  if (r >= rows) return;  // whole warps leave together
  const int lane = static_cast<int>(threadIdx.x % 32);
  const S* row = k + r * d;
  float acc = 0.0f;
  if (vec) {
    for (int i = 4 * lane; i < d; i += 128) {
      float x[4];
      detail::load_n<S, 4>(row + i, x);
      acc += x[0] * x[0] + x[1] * x[1] + x[2] * x[2] + x[3] * x[3];
    }
  } else {
    for (int i = lane; i < d; i += 32) {
      const float x = load(row, i);
      acc += x * x;
    }
  }
  acc = detail::warp_sum(acc);
  if (lane == 0) out[r] = -sqrtf(acc);
}

__global__ void pool_rows(const float* x, int rows, std::int64_t n, std::int64_t kernel, Pool pool, float* y) {
  const std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= static_cast<std::int64_t>(rows) * n) return;
  const std::int64_t row = e / n, i = e % n;
  const float* xr = x + row * n;
  if (pool == Pool::kNone || kernel <= 1) {
    y[e] = xr[i];
    return;
  }
  const std::int64_t half = kernel / 2;
  const std::int64_t lo = i - half < 0 ? 0 : i - half, hi = i + half > n - 1 ? n - 1 : i + half;
  float acc = pool == Pool::kAvg ? 0.0f : -INFINITY;
  for (std::int64_t j = lo; j <= hi; ++j) acc = pool == Pool::kAvg ? acc + xr[j] : fmaxf(acc, xr[j]);
  y[e] = pool == Pool::kAvg ? acc / static_cast<float>(kernel) : acc;
}

__global__ void group_rows(const float* in, int G, int kv_heads, std::int64_t n, Reduce r, float* out) {
  const std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= static_cast<std::int64_t>(kv_heads) * n) return;
  const std::int64_t g = e / n, j = e % n;
  float o = in[(g * G) * n + j];
  for (int i = 1; i < G; ++i) {
    const float x = in[(g * G + i) * n + j];
    o = r == Reduce::kMax ? fmaxf(o, x) : o + x;
  }
  out[e] = r == Reduce::kMean ? o / static_cast<float>(G) : o;
}

}  // namespace

void window_scores(const LayerShape& s, DType dtype, const void* q, const void* k, std::int64_t window, Reduce rows,
                   float* out, Stream stream) {
  const std::int64_t T = s.tokens, w = window < 0 ? 0 : window > T ? T : window;
  detail::check(cudaMemsetAsync(out, 0, static_cast<std::size_t>(s.q_heads * T) * sizeof(float), stream),
                "cudaMemsetAsync");
  if (w == 0 || T == 0) return;
  detail::dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    softmax_columns(s, static_cast<const S*>(q), static_cast<const S*>(k), T - w, static_cast<int>(w), rows, false,
                    out, stream);
  });
}

void accumulated_attention(const LayerShape& s, DType dtype, const void* q, const void* k, bool per_query, float* out,
                           Stream stream) {
  if (s.tokens == 0) return;
  detail::dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    softmax_columns(s, static_cast<const S*>(q), static_cast<const S*>(k), 0, static_cast<int>(s.tokens),
                    Reduce::kSum, per_query, out, stream);
  });
}

void key_norm_scores(const LayerShape& s, DType dtype, const void* k, float* out, Stream stream) {
  const std::int64_t rows = static_cast<std::int64_t>(s.kv_heads) * s.tokens;
  if (rows == 0) return;
  detail::dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    const bool vec = s.head_dim % 4 == 0 && detail::aligned(4 * sizeof(S), {k});
    key_norms<S><<<detail::grid_for(rows, kNormWarps), 32 * kNormWarps, 0, stream>>>(static_cast<const S*>(k), rows,
                                                                                  s.head_dim, vec, out);
  });
  KVSCOPE_CUDA_LAUNCHED("key_norms");
}

void pool1d(const float* x, int rows, std::int64_t n, std::int64_t kernel, Pool pool, float* y, Stream stream) {
  const std::int64_t total = static_cast<std::int64_t>(rows) * n;
  if (total == 0) return;
  pool_rows<<<detail::grid_for(total, kBlock), kBlock, 0, stream>>>(x, rows, n, kernel, pool, y);
  KVSCOPE_CUDA_LAUNCHED("pool_rows");
}

void group_reduce(const float* in, int q_heads, int kv_heads, std::int64_t n, Reduce r, float* out, Stream stream) {
  const std::int64_t total = static_cast<std::int64_t>(kv_heads) * n;
  if (total == 0) return;
  group_rows<<<detail::grid_for(total, kBlock), kBlock, 0, stream>>>(in, q_heads / kv_heads, kv_heads, n, r, out);
  KVSCOPE_CUDA_LAUNCHED("group_rows");
}

}  // namespace kvscope::opt::cuda
