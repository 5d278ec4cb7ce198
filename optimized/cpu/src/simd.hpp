// AVX2 helpers shared by the hand-vectorised loops (compiled only when the
// kernels target AVX2 + FMA; every caller keeps a portable fallback), and the
// reductions built on them. Horizontal sums are explicit: GCC's `omp simd`
// reduction over zmm registers ends in sixteen dependent scalar adds through
// the stack, which made the per-row kernels (key norms, decode logits)
// latency-bound rather than memory-bound.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

#include "kvscope/opt/cpu/storage.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVSCOPE_CPU_AVX2 1

namespace kvscope::opt::cpu::detail {

/// The eight lanes of v summed in a fixed order (halves, then pairs).
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/// hsum of eight vectors at once: lane u of the result is hsum(v[u]) bit for
/// bit (the same pairings: halves, then lanes i and i + 2, then 0 and 1), in
/// about a third of eight hsums' instructions.
inline __m256 hsum8(const __m256* v) {
  __m256 t[4];  // pair p: [v[2p] halves summed | v[2p + 1] halves summed]
  for (int p = 0; p < 4; ++p)
    t[p] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * p], v[2 * p + 1], 0x20),
                         _mm256_permute2f128_ps(v[2 * p], v[2 * p + 1], 0x31));
  // Lanes i + 2 onto i: [s0+s2, s1+s3] of v0, v2 | v1, v3 (and of v4, v6 | v5, v7).
  const __m256 y0 = _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 y1 = _mm256_add_ps(_mm256_shuffle_ps(t[2], t[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm256_shuffle_ps(t[2], t[3], _MM_SHUFFLE(3, 2, 3, 2)));
  // Lane 1 onto lane 0: [v0, v2, v4, v6 | v1, v3, v5, v7], then into order.
  const __m256 z = _mm256_add_ps(_mm256_shuffle_ps(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(y0, y1, _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm256_permutevar8x32_ps(z, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/// Eight storage elements as fp32, exact (load_row's conversions, in a register).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {  // bf16 is the top half of an fp32: widen the bits
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8(const f16* p) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  alignas(32) float x[8];
  for (int i = 0; i < 8; ++i) x[i] = to_f32(p[i]);
  return _mm256_load_ps(x);
#endif
}

/// Eight fp32 lanes behind the interface Lanes16 shares, for a loop written
/// once for both widths (the same operations lane by lane either way).
struct Lanes8 {
  using V = __m256;
  static constexpr int kWidth = 8;
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  template <class S>
  static V load(const S* p) { return load8(p); }  // storage, converted in registers
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
};

/// |row|^2 for d % 32 == 0 in fused_dots' order: block j of eight values to
/// chain j % 4, the chains summed (x0 + x1) + (x2 + x3), then hsum. Four
/// short chains where dot8 has one of d / 8 FMAs.
template <class S>
inline float sq_norm4(const S* row, int d) {
  __m256 x[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int c = 0; c < d; c += 32)
    for (int u = 0; u < 4; ++u) {
      const __m256 v = load8(row + c + 8 * u);
      x[u] = _mm256_fmadd_ps(v, v, x[u]);
    }
  return hsum(_mm256_add_ps(_mm256_add_ps(x[0], x[1]), _mm256_add_ps(x[2], x[3])));
}

/// The largest of the eight lanes (max is exact in any order).
inline float hmax(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

/// Running largest |x| and least non-zero |x| of eight lanes at a time (the
/// range a row's scale decision needs), kept as integers: a non-negative
/// float's bits order like the float, and bits - 1 wraps a zero to the top,
/// so one unsigned min skips zeros. Two 1-cycle integer ops per vector, where
/// a float max, compare, blend and min (4-cycle chains) made the range the
/// critical path of the bf16 cosine (docs/performance.md, run 12).
/// A NaN may count as the largest or be skipped; callers allow either.
struct AbsRange {
  __m256i hi = _mm256_setzero_si256();
  __m256i lo_m1 = _mm256_set1_epi32(-1);

  void add(__m256 x) {
    const __m256i b = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fffffff));
    hi = _mm256_max_epu32(hi, b);
    lo_m1 = _mm256_min_epu32(lo_m1, _mm256_sub_epi32(b, _mm256_set1_epi32(1)));
  }
  void add(const AbsRange& o) {
    hi = _mm256_max_epu32(hi, o.hi);
    lo_m1 = _mm256_min_epu32(lo_m1, o.lo_m1);
  }
  /// max |x| (0 when nothing was added).
  float high() const {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
    return std::bit_cast<float>(static_cast<std::uint32_t>(_mm_cvtsi128_si32(m)));
  }
  /// Least non-zero |x|; +inf when every x added was 0.
  float low() const {
    __m128i m = _mm_min_epu32(_mm256_castsi256_si128(lo_m1), _mm256_extracti128_si256(lo_m1, 1));
    m = _mm_min_epu32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_min_epu32(m, _mm_shuffle_epi32(m, 0xb1));
    const auto least = static_cast<std::uint32_t>(_mm_cvtsi128_si32(m));
    return least == UINT32_MAX ? INFINITY : std::bit_cast<float>(least + 1);
  }
};

#if defined(__AVX512F__) && defined(__AVX512DQ__)  // DQ: the 256-bit extracts
#define KVSCOPE_CPU_AVX512 1
// Around code that calls AVX-512 conversions, shuffles or extracts: GCC 12's
// start from _mm512_undefined_*(), which -Wuninitialized flags once inlined.
#define KVSCOPE_AVX512_WARNINGS_OFF                           \
  _Pragma("GCC diagnostic push")                              \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")       \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define KVSCOPE_AVX512_WARNINGS_ON _Pragma("GCC diagnostic pop")
KVSCOPE_AVX512_WARNINGS_OFF
/// Sixteen storage elements as fp32, exact (load8's conversions, one zmm).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

/// Sixteen fp32 lanes, Lanes8's interface.
struct Lanes16 {
  using V = __m512;
  static constexpr int kWidth = 16;
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  template <class S>
  static V load(const S* p) { return load16(p); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
};

/// The lower and upper eight lanes.
inline __m256 low8(__m512 v) { return _mm512_castps512_ps256(v); }
inline __m256 high8(__m512 v) { return _mm512_extractf32x8_ps(v, 1); }
/// A sixteen-lane chain as eight lanes: lane i + 8 added onto lane i.
inline __m256 halves_added(__m512 v) { return _mm256_add_ps(low8(v), high8(v)); }

/// AbsRange on sixteen lanes, for the zmm loops: no extract per add;
/// fold() is the AbsRange of everything added (the same two numbers).
struct AbsRange16 {
  __m512i hi = _mm512_setzero_si512();
  __m512i lo_m1 = _mm512_set1_epi32(-1);

  void add(__m512 x) {
    const __m512i b = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff));
    hi = _mm512_max_epu32(hi, b);
    lo_m1 = _mm512_min_epu32(lo_m1, _mm512_sub_epi32(b, _mm512_set1_epi32(1)));
  }
  AbsRange fold() const {
    AbsRange r;
    r.hi = _mm256_max_epu32(_mm512_castsi512_si256(hi), _mm512_extracti64x4_epi64(hi, 1));
    r.lo_m1 = _mm256_min_epu32(_mm512_castsi512_si256(lo_m1), _mm512_extracti64x4_epi64(lo_m1, 1));
    return r;
  }
};

/// The sum of four eight-lane chains held in two zmm, v01 = [x0 | x1] and
/// v23 = [x2 | x3]: hsum((x0 + x1) + (x2 + x3)), as the AVX2 loops that
/// keep x0..x3 in four ymm sum them (fused_dots, the Gaussian distances).
inline float sum_of_chains(__m512 v01, __m512 v23) {
  return hsum(_mm256_add_ps(_mm256_add_ps(low8(v01), high8(v01)), _mm256_add_ps(low8(v23), high8(v23))));
}

/// sq_norm4 of eight consecutive rows (d % 32 == 0), the same bits: sixteen
/// lanes hold two of its chains ([x0 | x1], [x2 | x3]), so each value is
/// converted and squared by one zmm instruction, and one hsum8 ends all eight.
template <class S>
inline __m256 sq_norms4_x8(const S* rows, int d) {
  __m512 acc[8][2];  // sixteen zmm: indexed by constants only, so they stay in registers
  for (auto& a : acc) a[0] = a[1] = _mm512_setzero_ps();
  for (int c = 0; c < d; c += 32)
    for (int u = 0; u < 8; ++u) {
      const __m512 v01 = load16(rows + u * d + c), v23 = load16(rows + u * d + c + 16);
      acc[u][0] = _mm512_fmadd_ps(v01, v01, acc[u][0]);
      acc[u][1] = _mm512_fmadd_ps(v23, v23, acc[u][1]);
    }
  __m256 r[8];
  for (int u = 0; u < 8; ++u)
    r[u] = _mm256_add_ps(_mm256_add_ps(low8(acc[u][0]), high8(acc[u][0])),
                         _mm256_add_ps(low8(acc[u][1]), high8(acc[u][1])));
  return hsum8(r);
}
KVSCOPE_AVX512_WARNINGS_ON
#endif

/// logits[4, 2] (stride ld) of four query rows (Q, row stride d) against keys
/// ka and kb, read from storage and converted in registers: eight FMA chains,
/// each equal to dot_qk's, summed together at the end. The few-rows Q.K^T
/// tile of window_scores' direct path and of decode (a GQA group of four
/// heads). Under AVX-512 (d % 16 == 0) the chains are sixteen lanes wide:
/// half the FMAs of eight-lane chains, where these loops are bound by them.
#if KVSCOPE_CPU_AVX512
KVSCOPE_AVX512_WARNINGS_OFF
#endif
template <class S>
inline void qk_4x2(const float* Q, const S* ka, const S* kb, int d, float* logits, std::int64_t ld) {
  __m256 acc[8];
#if KVSCOPE_CPU_AVX512
  if (d % 16 == 0) {
    __m512 wide[8];
    for (__m512& a : wide) a = _mm512_setzero_ps();
    for (int c = 0; c < d; c += 16) {
      const __m512 x = load16(ka + c), y = load16(kb + c);
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const __m512 q = _mm512_loadu_ps(Q + u * d + c);
        wide[2 * u] = _mm512_fmadd_ps(q, x, wide[2 * u]);
        wide[2 * u + 1] = _mm512_fmadd_ps(q, y, wide[2 * u + 1]);
      }
    }
    for (int a = 0; a < 8; ++a) acc[a] = halves_added(wide[a]);
  } else
#endif
  {
    for (__m256& a : acc) a = _mm256_setzero_ps();
    for (int c = 0; c < d; c += 8) {
      const __m256 x = load8(ka + c), y = load8(kb + c);
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const __m256 q = _mm256_loadu_ps(Q + u * d + c);
        acc[2 * u] = _mm256_fmadd_ps(q, x, acc[2 * u]);
        acc[2 * u + 1] = _mm256_fmadd_ps(q, y, acc[2 * u + 1]);
      }
    }
  }
  const __m256 l = hsum8(acc);  // rows 0..3, keys (a, b) in lane pairs
  const __m128 lo = _mm256_castps256_ps128(l), hi = _mm256_extractf128_ps(l, 1);
  _mm_storel_pi(reinterpret_cast<__m64*>(logits), lo);
  _mm_storeh_pi(reinterpret_cast<__m64*>(logits + ld), lo);
  _mm_storel_pi(reinterpret_cast<__m64*>(logits + 2 * ld), hi);
  _mm_storeh_pi(reinterpret_cast<__m64*>(logits + 3 * ld), hi);
}
#if KVSCOPE_CPU_AVX512
KVSCOPE_AVX512_WARNINGS_ON
#endif

}  // namespace kvscope::opt::cpu::detail
#endif

namespace kvscope::opt::cpu::detail {

/// q . k over d floats as one eight-lane FMA chain and a fixed horizontal sum
/// (d % 8 == 0 under AVX2; else dot()). The blocked loops that compute many
/// logits at once (direct_qkt, decode's block_logits) give exactly this value.
inline float dot8(const float* q, const float* k, int d) {
#if KVSCOPE_CPU_AVX2
  if (d % 8 == 0) {
    __m256 a = _mm256_setzero_ps();
    for (int c = 0; c < d; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(k + c), a);
    return hsum(a);
  }
#endif
  return dot(q, k, d);
}

/// q . k of one logit in the few-row paths (window_scores' direct path,
/// decode): the chain qk_4x2 keeps for it, so a key outside its two-key
/// steps (an odd last key, fewer than four rows) gets the same bits. Under
/// AVX-512 with d % 16 == 0, one sixteen-lane FMA chain, its halves added,
/// then hsum; otherwise dot8.
#if KVSCOPE_CPU_AVX512
KVSCOPE_AVX512_WARNINGS_OFF
#endif
inline float dot_qk(const float* q, const float* k, int d) {
#if KVSCOPE_CPU_AVX512
  if (d % 16 == 0) {
    __m512 a = _mm512_setzero_ps();
    for (int c = 0; c < d; c += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(k + c), a);
    return hsum(halves_added(a));
  }
#endif
  return dot8(q, k, d);
}
#if KVSCOPE_CPU_AVX512
KVSCOPE_AVX512_WARNINGS_ON
#endif

/// max_i |x_i| (0 for n = 0). Max is exact in any order; a NaN may be kept or
/// dropped, which callers allow.
inline float max_abs(const float* x, int n) {
  int i = 0;
  float m = 0.0f;
#if KVSCOPE_CPU_AVX2
  const __m256 sign = _mm256_set1_ps(-0.0f);
  // Four independent max chains (one chain of n / 8 dependent maxes was the
  // critical path of a row's scaling).
  __m256 v[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (; i + 32 <= n; i += 32)
    for (int l = 0; l < 4; ++l) v[l] = _mm256_max_ps(v[l], _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i + 8 * l)));
  for (; i + 8 <= n; i += 8) v[0] = _mm256_max_ps(v[0], _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  m = hmax(_mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3])));
#endif
  for (; i < n; ++i) m = std::max(m, std::abs(x[i]));
  return m;
}

/// 2^h for a normal exponent, h in [-126, 127], built from its bits (no
/// ldexp call: the scaled kernels take one or two per row or run).
inline float pow2(int h) { return std::bit_cast<float>(static_cast<std::uint32_t>(127 + h) << 23); }

/// Whether rescaling a row (or a run of rows) by 2^-e, e the scale exponent
/// of its largest |entry|, changes no bit of the sums of products formed from
/// it, given lo, its least non-zero |entry|, and `floor`, a bound that makes
/// every exact product a multiple of 2^-134 or coarser (2^-60 for 8-bit
/// significands such as bf16's, 2^-40 for fp32's 24 bits). With e in [-7, 7]
/// nothing overflows and a product moves by at most 2^14, so every sum below
/// fp32's normal range stays exact either way, and a power-of-two scale
/// commutes with every other rounding: the results scale exactly.
inline bool rescale_changes_no_bit(int e, float lo, float floor) { return e == 0 || (e >= -7 && e <= 7 && lo >= floor); }

/// max |x| over n floats, and in `lo` the least non-zero |x| (+inf when every
/// x is 0). NaNs may or may not count.
inline float abs_range(const float* x, int n, float& lo) {
  int i = 0;
  float hi = 0.0f;
  lo = INFINITY;
#if KVSCOPE_CPU_AVX2
  AbsRange r[2];
  for (; i + 16 <= n; i += 16)
    for (int u = 0; u < 2; ++u) r[u].add(_mm256_loadu_ps(x + i + 8 * u));
  r[0].add(r[1]);
  hi = r[0].high();
  lo = r[0].low();
#endif
  for (; i < n; ++i) {
    const float a = std::abs(x[i]);
    hi = std::max(hi, a);
    if (a != 0.0f) lo = std::min(lo, a);
  }
  return hi;
}

}  // namespace kvscope::opt::cpu::detail
