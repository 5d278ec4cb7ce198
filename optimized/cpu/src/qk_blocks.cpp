#include "qk_blocks.hpp"

#include <algorithm>
#include <vector>

#include "simd.hpp"

#if defined(__AVX2__)
#include <immintrin.h>
// glibc's libmvec: expf on eight lanes (x86_64 vector function ABI, AVX2).
extern "C" __m256 _ZGVdN8v_expf(__m256 x);
#endif
#if defined(__AVX512F__)
// The same on sixteen lanes: 1.4x the eight-lane throughput on Zen 4, and the
// same bits as two eight-lane calls (checked on all 2^32 inputs, glibc 2.36).
extern "C" __m512 _ZGVeN16v_expf(__m512 x);
#endif
#include <cmath>

namespace kvscope::opt::cpu::detail {

namespace {

#if KVSCOPE_CPU_AVX2
/// Keys per tile: a query row's logits are two ymm (one zmm under AVX-512).
constexpr int kTileKeys = 16;
/// Query rows per tile. AVX2: MR x 2 ymm accumulators, two key vectors and a
/// broadcast fill its 16 registers. AVX-512: a row's 16 logits are one zmm,
/// so 16 accumulators, a key vector and a broadcast (of 32), and R = 32 or
/// 128 window rows split into whole tiles.
#if defined(__AVX512F__)
constexpr int kTileRows = 16;
#else
constexpr int kTileRows = 6;
#endif

/// out[c * 8 + v] = row[v][c0 + c] for an 8 x 8 block of storage, as fp32
/// (converted in registers, exact).
template <class S>
inline void transpose8(const S* const* row, int c0, float* out, std::int64_t out_ld) {
  __m256 r[8], t[8];
  for (int v = 0; v < 8; ++v) r[v] = load8(row[v] + c0);
  for (int p = 0; p < 4; ++p) {
    t[2 * p] = _mm256_unpacklo_ps(r[2 * p], r[2 * p + 1]);
    t[2 * p + 1] = _mm256_unpackhi_ps(r[2 * p], r[2 * p + 1]);
  }
  for (int p = 0; p < 2; ++p) {
    r[4 * p] = _mm256_shuffle_ps(t[4 * p], t[4 * p + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * p + 1] = _mm256_shuffle_ps(t[4 * p], t[4 * p + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * p + 2] = _mm256_shuffle_ps(t[4 * p + 1], t[4 * p + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * p + 3] = _mm256_shuffle_ps(t[4 * p + 1], t[4 * p + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(out + c * out_ld, _mm256_permute2f128_ps(r[c], r[c + 4], 0x20));
    _mm256_storeu_ps(out + (c + 4) * out_ld, _mm256_permute2f128_ps(r[c], r[c + 4], 0x31));
  }
}

/// Kt[c * 16 + v] = row[v][c] as fp32 for the tile's n <= 16 keys (missing keys 0).
template <class S>
void transpose_tile(const S* const* row, std::int64_t n, int d, float* Kt) {
  if (n == kTileKeys && d % 8 == 0) {
    for (int c = 0; c < d; c += 8)
      for (int h = 0; h < 2; ++h) transpose8(row + h * 8, c, Kt + c * kTileKeys + h * 8, kTileKeys);
    return;
  }
  for (int c = 0; c < d; ++c)
    for (int v = 0; v < kTileKeys; ++v) Kt[c * kTileKeys + v] = v < n ? to_f32(row[v][c]) : 0.0f;
}

/// logits[MR, n <= 16] of MR query rows against one transposed key tile: each
/// logit is q_0 k_0 + q_1 k_1 + ... as one FMA chain in c order, whatever
/// the tile shape (so a logit depends on its q and k only).
template <int MR>
inline void qkt_tile(const float* Q, int d, const float* Kt, std::int64_t n, float* logits, std::int64_t ld) {
#if defined(__AVX512F__)
  // A row's 16 keys in one zmm: the lanes are keys, so every logit is still
  // its own chain in c order (the same bits as two ymm halves), at half the
  // FMA instructions.
  __m512 z[MR];
#pragma GCC unroll 16
  for (int u = 0; u < MR; ++u) z[u] = _mm512_setzero_ps();
  for (int c = 0; c < d; ++c) {
    const __m512 k = _mm512_loadu_ps(Kt + c * kTileKeys);
#pragma GCC unroll 16
    for (int u = 0; u < MR; ++u) z[u] = _mm512_fmadd_ps(_mm512_set1_ps(Q[u * d + c]), k, z[u]);
  }
  const auto keys = static_cast<__mmask16>(n >= kTileKeys ? 0xffffu : (1u << n) - 1u);
#pragma GCC unroll 16
  for (int u = 0; u < MR; ++u) _mm512_mask_storeu_ps(logits + u * ld, keys, z[u]);
#else
  __m256 a[MR][2];
#pragma GCC unroll 16
  for (int u = 0; u < MR; ++u) a[u][0] = a[u][1] = _mm256_setzero_ps();
  for (int c = 0; c < d; ++c) {
    const __m256 k0 = _mm256_loadu_ps(Kt + c * kTileKeys), k1 = _mm256_loadu_ps(Kt + c * kTileKeys + 8);
#pragma GCC unroll 16
    for (int u = 0; u < MR; ++u) {
      const __m256 q = _mm256_broadcast_ss(Q + u * d + c);
      a[u][0] = _mm256_fmadd_ps(q, k0, a[u][0]);
      a[u][1] = _mm256_fmadd_ps(q, k1, a[u][1]);
    }
  }
#pragma GCC unroll 16
  for (int u = 0; u < MR; ++u) {
    float* out = logits + u * ld;
    if (n == kTileKeys) {
      _mm256_storeu_ps(out, a[u][0]);
      _mm256_storeu_ps(out + 8, a[u][1]);
    } else {
      alignas(32) float row[kTileKeys];
      _mm256_store_ps(row, a[u][0]);
      _mm256_store_ps(row + 8, a[u][1]);
      std::copy(row, row + n, out);
    }
  }
#endif
}

/// The last rows < kTileRows of a key tile, as one tile of their count.
template <int MR = kTileRows - 1>
void qkt_rest(std::int64_t rows, const float* Q, int d, const float* Kt, std::int64_t n, float* logits, std::int64_t ld) {
  if constexpr (MR > 0) {
    if (rows == MR)
      qkt_tile<MR>(Q, d, Kt, n, logits, ld);
    else
      qkt_rest<MR - 1>(rows, Q, d, Kt, n, logits, ld);
  }
}
#endif

}  // namespace

/// gemm_qkt over the keys K + key(v) * d, v < n (key(v) = v or rows[v]).
template <class S>
void gemm_qkt_rows(const float* Q, std::int64_t R, const S* K, const std::int64_t* rows, std::int64_t n, int d,
                   float* logits, std::int64_t ld) {
  if (R == 0 || n == 0) return;
  const auto key = [&](std::int64_t v) { return K + (rows ? rows[v] : v) * d; };
#if KVSCOPE_CPU_AVX2
  // Key tiles outside (converted and transposed once, kept in L1), query rows inside.
  std::vector<float> Kt(static_cast<std::size_t>(kTileKeys * d));
  const S* tile[kTileKeys];
  // The tile after next is hinted a share before each row tile: a tile read
  // straight from memory (window scores) otherwise stalls its transpose, and
  // one burst of 64 hints stalled on the miss queue. Contiguous keys: one
  // range, past n too (a hint never faults, and a caller's next block
  // usually follows); gathered keys: row by row, up to n.
  const std::int64_t row_bytes = d * static_cast<std::int64_t>(sizeof(S)), tile_bytes = kTileKeys * row_bytes;
  const std::int64_t row_tiles = (R + kTileRows - 1) / kTileRows;
  const std::int64_t share = (tile_bytes / row_tiles + 63) / 64 * 64;
  const std::int64_t rows_per_share = (kTileKeys + row_tiles - 1) / row_tiles;
  for (std::int64_t j = 0; j < n; j += kTileKeys) {
    const std::int64_t nj = std::min<std::int64_t>(kTileKeys, n - j), next = j + 2 * kTileKeys;
    for (std::int64_t v = 0; v < nj; ++v) tile[v] = key(j + v);
    transpose_tile(tile, nj, d, Kt.data());
    std::int64_t r = 0, hinted = 0;
    const auto hint = [&] {
      if (!rows) {
        const std::int64_t b = std::min(share, tile_bytes - hinted);
        if (b > 0) prefetch(reinterpret_cast<const char*>(K + next * d) + hinted, static_cast<std::size_t>(b));
        hinted += b;
        return;
      }
      for (std::int64_t u = 0; u < rows_per_share && hinted < kTileKeys && next + hinted < n; ++u, ++hinted)
        prefetch(key(next + hinted), static_cast<std::size_t>(row_bytes));
    };
    for (; r + kTileRows <= R; r += kTileRows) {
      hint();
      qkt_tile<kTileRows>(Q + r * d, d, Kt.data(), nj, logits + r * ld + j, ld);
    }
    hint();
    qkt_rest(R - r, Q + r * d, d, Kt.data(), nj, logits + r * ld + j, ld);
  }
#else
  // Without AVX2, one dot8 per logit: a function of its query and key only.
  // (Eigen's GEMM kernel, used here before, gave a row in a full register
  // block other bits than in a remainder block: the logits depended on the
  // block layout, CpuKernels.GroupBlockLogitsDependOnlyOnTheirQueryAndKey.)
  std::vector<float> k(static_cast<std::size_t>(d));
  for (std::int64_t j = 0; j < n; ++j) {
    load_row(key(j), d, k.data());
    for (std::int64_t r = 0; r < R; ++r) logits[r * ld + j] = dot8(Q + r * d, k.data(), d);
  }
#endif
}

template <class S>
void gemm_qkt(const float* Q, std::int64_t R, const S* K, std::int64_t n, int d, float* logits, std::int64_t ld) {
  gemm_qkt_rows(Q, R, K, nullptr, n, d, logits, ld);
}

template void gemm_qkt<float>(const float*, std::int64_t, const float*, std::int64_t, int, float*, std::int64_t);
template void gemm_qkt<f16>(const float*, std::int64_t, const f16*, std::int64_t, int, float*, std::int64_t);
template void gemm_qkt<bf16>(const float*, std::int64_t, const bf16*, std::int64_t, int, float*, std::int64_t);
template void gemm_qkt_rows<float>(const float*, std::int64_t, const float*, const std::int64_t*, std::int64_t, int,
                                   float*, std::int64_t);
template void gemm_qkt_rows<f16>(const float*, std::int64_t, const f16*, const std::int64_t*, std::int64_t, int, float*,
                                 std::int64_t);
template void gemm_qkt_rows<bf16>(const float*, std::int64_t, const bf16*, const std::int64_t*, std::int64_t, int,
                                  float*, std::int64_t);

constexpr int kLanes = 8;

void exp_inplace(float* x, std::int64_t n) {
#if defined(__AVX2__)
  std::int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) _mm512_storeu_ps(x + i, _ZGVeN16v_expf(_mm512_loadu_ps(x + i)));
#endif
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

/// max / sum with many accumulators in a fixed order (vectorisable as
/// written; no reassociation is needed or allowed).
float max_of(const float* x, std::int64_t n) {
  // Four vectors of lanes: one was a chain of dependent maxes, 4 cycles per
  // eight floats (max is exact in any order).
  constexpr int kWide = 4 * kLanes;
  std::int64_t i = 0;
#if defined(__AVX2__)
  // By hand: GCC compiled the loop below to scalar compares and branches.
  // max_ps(x, m) is std::max(m, x) lane by lane: m unless x > m (so m when x
  // is NaN, and m on equal values, -0 and +0 included).
  __m256 v[4];
  for (auto& a : v) a = _mm256_set1_ps(-INFINITY);
  for (; i + kWide <= n; i += kWide)
    for (int u = 0; u < 4; ++u) v[u] = _mm256_max_ps(_mm256_loadu_ps(x + i + u * kLanes), v[u]);
  // The 32 lanes reduced in a tree of vector maxes: a scalar pass over them
  // was a chain of 32 dependent maxes, ~130 cycles, most of decode's
  // per-block softmax (docs/performance.md, run 18). No lane holds a NaN.
  const __m256 a = _mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3]));
  __m128 b = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_max_ps(b, _mm_movehl_ps(b, b));
  float r = _mm_cvtss_f32(_mm_max_ss(b, _mm_shuffle_ps(b, b, 1)));
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
#else
  float m[kWide];
  std::fill(m, m + kWide, -INFINITY);
  for (; i + kWide <= n; i += kWide)
    for (int l = 0; l < kWide; ++l) m[l] = std::max(m[l], x[i + l]);
  for (; i < n; ++i) m[0] = std::max(m[0], x[i]);
  return *std::max_element(m, m + kWide);
#endif
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
#if defined(__AVX512F__)
  // Sixteen at a time, added to the eight lane sums as two halves in order.
  const __m512 vm16 = _mm512_set1_ps(m);
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm16));
    _mm512_storeu_ps(x + i, e);
    // The halves read back from the store (GCC 12 warns on every 512 -> 256 extract).
    lanes = _mm256_add_ps(lanes, _mm256_loadu_ps(x + i));
    lanes = _mm256_add_ps(lanes, _mm256_loadu_ps(x + i + kLanes));
  }
#endif
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

}  // namespace kvscope::opt::cpu::detail
