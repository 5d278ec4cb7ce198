// Column reductions of causal softmax rows (window_scores and
// accumulated_attention in scores.cu), tiled: 64 x 64 tiles of q.k logits
// computed by 256 threads, 4 x 4 per thread, from fp32 copies of 32-deep
// slices of Q and K in shared memory (SIMT fp32, as the CPU: no tensor-core
// rounding). Two passes, recomputing the logits in the second instead of
// keeping a T x T matrix:
//   1. softmax_row_stats: per query row, the max and normaliser (online, per
//      key tile), one block per 64 rows and run of 8 key tiles, then
//      softmax_row_merge over the runs;
//   2. softmax_column_reduce: per key, sum / mean / max of the probabilities
//      over the rows, one block per 64 keys.
// Every sum runs in a fixed order (per-thread in tile order, then fixed
// butterflies or a fixed row-of-threads order): the same bits on every run.
#pragma once

#include <cmath>

#include "common.cuh"
#include "kvscope/opt/cuda/kernels.hpp"

namespace kvscope::opt::cuda::detail {

constexpr int kTile = 64, kDepth = 32, kTileThreads = 256;  // 16 x 16 threads, 4 x 4 logits each

/// Shared slices of the two operands, transposed: a[kk][row], b[kk][col].
struct TileOperands {
  float a[kDepth][kTile];
  float b[kDepth][kTile];
};

/// s[i][j] = (scale q_row) . k_col for this thread's rows ty*4 + i and
/// columns tx*4 + j of the tile whose first query row is q_rows and first key
/// row k_rows (nq, nk of them valid; the others read as zeros).
template <class S>
__device__ __forceinline__ void logits_tile(const S* q_rows, int nq, const S* k_rows, int nk, int d, float scale,
                                            TileOperands& sm, float (&s)[4][4]) {
  const int tid = static_cast<int>(threadIdx.x), tx = tid % 16, ty = tid / 16;
  const int row = tid / 4, seg = (tid % 4) * 8;  // staging: 8 consecutive elements of one row
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[i][j] = 0.0f;
  for (int d0 = 0; d0 < d; d0 += kDepth) {
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int dd = d0 + seg + u;
      sm.a[seg + u][row] = row < nq && dd < d ? load(q_rows, static_cast<std::int64_t>(row) * d + dd) * scale : 0.0f;
      sm.b[seg + u][row] = row < nk && dd < d ? load(k_rows, static_cast<std::int64_t>(row) * d + dd) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kDepth; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(&sm.a[kk][ty * 4]);
      const float4 bv = *reinterpret_cast<const float4*>(&sm.b[kk][tx * 4]);
      const float a[4] = {av.x, av.y, av.z, av.w}, b[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
}

/// Max / sum over the 16 threads of a row of the tile (one half-warp), by butterfly.
__device__ __forceinline__ float row_max16(float x) {
  for (int m = 8; m > 0; m /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}
__device__ __forceinline__ float row_sum16(float x) {
  for (int m = 8; m > 0; m /= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

/// Key tiles one softmax_row_stats block folds: the causal key range of a
/// row tile is split into runs of this many tiles (blockIdx.z), so a few
/// long rows (window scores) still fill the GPU and long and short causal
/// rows balance; softmax_row_merge then folds the splits in order.
constexpr int kSplitTiles = 8;

/// Rows r = 0..R-1 are queries t = first + r of q head blockIdx.y, attending
/// keys 0..t (causal). Writes each row's max and normaliser over the keys of
/// split blockIdx.z: part [splits, q_heads, R, 2] (-inf, 0 where the split
/// holds none of the row's keys).
template <class S>
__global__ void __launch_bounds__(kTileThreads) softmax_row_stats(const S* q, const S* k, std::int64_t T, int d, int G,
                                                                  std::int64_t first, int R, float scale,
                                                                  float* part) {
  __shared__ __align__(16) TileOperands sm;
  const int tid = static_cast<int>(threadIdx.x), tx = tid % 16, ty = tid / 16;
  const int h = static_cast<int>(blockIdx.y), q_heads = static_cast<int>(gridDim.y);
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.x) * kTile;
  const int nq = static_cast<int>(R - r0 < kTile ? R - r0 : kTile);
  const S* qh = q + (static_cast<std::int64_t>(h) * T + first + r0) * d;
  const S* kh = k + static_cast<std::int64_t>(h / G) * T * d;
  const std::int64_t t_last = first + r0 + nq - 1;
  const std::int64_t k_begin = static_cast<std::int64_t>(blockIdx.z) * kSplitTiles * kTile;
  const std::int64_t k_end = k_begin + kSplitTiles * kTile;
  float m[4], l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) m[i] = -INFINITY, l[i] = 0.0f;
  for (std::int64_t j0 = k_begin; j0 <= t_last && j0 < k_end; j0 += kTile) {
    const int nk = static_cast<int>(T - j0 < kTile ? T - j0 : kTile);
    float s[4][4];
    logits_tile(qh, nq, kh + j0 * d, nk, d, scale, sm, s);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const std::int64_t t = first + r0 + ty * 4 + i;
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const std::int64_t key = j0 + tx * 4 + j;
        if (ty * 4 + i >= nq || tx * 4 + j >= nk || key > t) s[i][j] = -INFINITY;  // outside the causal row
        tile_max = fmaxf(tile_max, s[i][j]);
      }
      const float new_m = fmaxf(m[i], row_max16(tile_max));
      if (new_m == -INFINITY) continue;  // nothing seen yet in this row
      float li = m[i] == -INFINITY ? 0.0f : l[i] * expf(m[i] - new_m);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (s[i][j] != -INFINITY) li += expf(s[i][j] - new_m);
      l[i] = li;
      m[i] = new_m;
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float L = row_sum16(l[i]);
    if (tx == 0 && ty * 4 + i < nq) {
      float* out = part + ((static_cast<std::int64_t>(blockIdx.z) * q_heads + h) * R + r0 + ty * 4 + i) * 2;
      out[0] = m[i];
      out[1] = L;
    }
  }
}

/// Folds the splits' (max, normaliser) of every row, split order: row_max,
/// row_sum [rows] (rows = q_heads * R; part [splits, rows, 2]).
__global__ void softmax_row_merge(const float* part, int splits, std::int64_t rows, float* row_max, float* row_sum) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  float M = -INFINITY;
  for (int z = 0; z < splits; ++z) M = fmaxf(M, part[(z * rows + r) * 2]);
  float L = 0.0f;
  for (int z = 0; z < splits; ++z) {
    const float m = part[(z * rows + r) * 2];
    if (m != -INFINITY) L += part[(z * rows + r) * 2 + 1] * expf(m - M);
  }
  row_max[r] = M;
  row_sum[r] = L;
}

/// Per q head blockIdx.y and key j of the block's 64: the sum / mean / max
/// over rows r (query first + r >= j) of p_r(j) = exp(x - max_r) / sum_r;
/// mean divides by R, `per_query` by T - j. out [q_heads, T].
template <class S>
__global__ void __launch_bounds__(kTileThreads) softmax_column_reduce(const S* q, const S* k, std::int64_t T, int d,
                                                                      int G, std::int64_t first, int R, float scale,
                                                                      const float* row_max, const float* row_sum,
                                                                      Reduce rows, bool per_query, float* out) {
  __shared__ __align__(16) TileOperands sm;
  __shared__ float rmax[kTile], rinv[kTile];
  __shared__ float partial[16][kTile];
  const int tid = static_cast<int>(threadIdx.x), tx = tid % 16, ty = tid / 16;
  const int h = static_cast<int>(blockIdx.y);
  const std::int64_t j0 = static_cast<std::int64_t>(blockIdx.x) * kTile;
  const int nk = static_cast<int>(T - j0 < kTile ? T - j0 : kTile);
  const S* kh = k + (static_cast<std::int64_t>(h / G) * T + j0) * d;
  const bool take_max = rows == Reduce::kMax;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // probabilities are >= 0: also the max identity
  for (std::int64_t r0 = j0 - first > 0 ? j0 - first : 0; r0 < R; r0 += kTile) {
    const int nq = static_cast<int>(R - r0 < kTile ? R - r0 : kTile);
    __syncthreads();  // the previous tile is done with rmax / rinv
    if (tid < nq) {
      rmax[tid] = row_max[static_cast<std::int64_t>(h) * R + r0 + tid];
      rinv[tid] = 1.0f / row_sum[static_cast<std::int64_t>(h) * R + r0 + tid];
    }
    float s[4][4];
    logits_tile(q + (static_cast<std::int64_t>(h) * T + first + r0) * d, nq, kh, nk, d, scale, sm, s);  // syncs
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int ri = ty * 4 + i;
      const std::int64_t t = first + r0 + ri;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (ri >= nq || tx * 4 + j >= nk || j0 + tx * 4 + j > t) continue;
        const float p = expf(s[i][j] - rmax[ri]) * rinv[ri];
        acc[j] = take_max ? fmaxf(acc[j], p) : acc[j] + p;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) partial[ty][tx * 4 + j] = acc[j];
  __syncthreads();
  if (tid < nk) {
    float v = partial[0][tid];
    for (int y = 1; y < 16; ++y) v = take_max ? fmaxf(v, partial[y][tid]) : v + partial[y][tid];
    if (rows == Reduce::kMean) v /= static_cast<float>(R);
    if (per_query) v /= static_cast<float>(T - (j0 + tid));
    out[static_cast<std::int64_t>(h) * T + j0 + tid] = v;
  }
}

}  // namespace kvscope::opt::cuda::detail
