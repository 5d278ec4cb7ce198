// Score kernels (cpu counterparts: optimized/cpu/src/scores.cpp). Softmax rows
// are two kernels: one block per query row reduces its max and normaliser
// (a fixed tree), then one thread per key sums its probabilities over the rows
// in row order. Recomputing q.k in the second pass trades FLOPs for no T x T
// buffer.
#include <cmath>

#include "common.cuh"
#include "kvscope/opt/cuda/kernels.hpp"

namespace kvscope::opt::cuda {
namespace {

using detail::kBlock;
using detail::load;

/// Row statistics of causal softmax rows: query t_r of q head h attends keys
/// 0..t_r. Rows are r = 0..R-1 with t_r = first + r. Writes max and sum of exp.
template <class S>
__global__ void row_stats(const S* q, const S* k, std::int64_t T, int d, int G, std::int64_t first, int R, float scale,
                          float* row_max, float* row_sum) {
  extern __shared__ float smem[];  // d floats of the scaled query, then kBlock scratch
  float* qs = smem;
  float* scratch = smem + d;
  const int r = blockIdx.x, h = blockIdx.y;  // rows on x: up to 2^31 - 1 of them
  const std::int64_t t = first + r;
  const S* qrow = q + (static_cast<std::int64_t>(h) * T + t) * d;
  const S* kh = k + static_cast<std::int64_t>(h / G) * T * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) qs[i] = load(qrow, i) * scale;
  __syncthreads();
  // Each thread folds its keys into its own (max, sum); the block then combines.
  float m = -INFINITY, s = 0.0f;
  for (std::int64_t j = threadIdx.x; j <= t; j += blockDim.x) {
    float x = 0.0f;
    for (int i = 0; i < d; ++i) x += qs[i] * load(kh, j * d + i);
    if (x > m) {
      s = s * expf(m - x) + 1.0f;
      m = x;
    } else {
      s += expf(x - m);
    }
  }
  const float M = detail::block_max(m, scratch);
  const float L = detail::block_sum(m == -INFINITY ? 0.0f : s * expf(m - M), scratch);
  if (threadIdx.x == 0) {
    row_max[static_cast<std::int64_t>(h) * R + r] = M;
    row_sum[static_cast<std::int64_t>(h) * R + r] = L;
  }
}

/// Per q head h and key j: reduce the probabilities p_r(j) of rows r (query
/// first + r, causal) in row order. mean divides by `divide` (0: by T - j).
template <class S>
__global__ void column_reduce(const S* q, const S* k, std::int64_t T, int d, int G, std::int64_t first, int R,
                              float scale, const float* row_max, const float* row_sum, Reduce rows, bool per_query,
                              float* out) {
  const int h = blockIdx.y;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= T) return;
  const S* kj = k + (static_cast<std::int64_t>(h / G) * T + j) * d;
  float acc = 0.0f;  // probabilities are >= 0: also the max identity
  for (int r = 0; r < R; ++r) {
    const std::int64_t t = first + r;
    if (j > t) continue;
    const S* qrow = q + (static_cast<std::int64_t>(h) * T + t) * d;
    float x = 0.0f;
    for (int i = 0; i < d; ++i) x += (load(qrow, i) * scale) * load(kj, i);
    const std::int64_t idx = static_cast<std::int64_t>(h) * R + r;
    const float p = expf(x - row_max[idx]) * (1.0f / row_sum[idx]);
    acc = rows == Reduce::kMax ? fmaxf(acc, p) : acc + p;
  }
  if (rows == Reduce::kMean) acc /= static_cast<float>(R);
  if (per_query) acc /= static_cast<float>(T - j);
  out[static_cast<std::int64_t>(h) * T + j] = acc;
}

/// Softmax rows first..first+R-1 of every q head, reduced per key into out [q_heads, T].
template <class S>
void softmax_columns(const LayerShape& s, const S* q, const S* k, std::int64_t first, int R, Reduce rows,
                     bool per_query, float* out, cudaStream_t stream) {
  const std::int64_t T = s.tokens;
  const int d = s.head_dim, G = s.group();
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  detail::Scratch<float> mx(static_cast<std::int64_t>(s.q_heads) * R, stream), sm(static_cast<std::int64_t>(s.q_heads) * R, stream);
  const std::size_t shared = static_cast<std::size_t>(d + kBlock) * sizeof(float);
  row_stats<S><<<dim3(static_cast<unsigned>(R), static_cast<unsigned>(s.q_heads)), kBlock, shared, stream>>>(
      q, k, T, d, G, first, R, scale, mx.get(), sm.get());
  KVSCOPE_CUDA_LAUNCHED("row_stats");
  column_reduce<S><<<dim3(detail::grid_for(T, kBlock), static_cast<unsigned>(s.q_heads)), kBlock, 0, stream>>>(
      q, k, T, d, G, first, R, scale, mx.get(), sm.get(), rows, per_query, out);
  KVSCOPE_CUDA_LAUNCHED("column_reduce");
}

template <class S>
__global__ void key_norms(const S* k, std::int64_t rows, int d, float* out) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  float acc = 0.0f;
  for (int i = 0; i < d; ++i) {
    const float x = load(k, r * d + i);
    acc += x * x;
  }
  out[r] = -sqrtf(acc);
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
    key_norms<S><<<detail::grid_for(rows, kBlock), kBlock, 0, stream>>>(static_cast<const S*>(k), rows, s.head_dim, out);
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
