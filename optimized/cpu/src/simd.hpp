// AVX2 helpers shared by the hand-vectorised loops (compiled only when the
// kernels target AVX2 + FMA; every caller keeps a portable fallback).
#pragma once

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

}  // namespace kvscope::opt::cpu::detail
#endif
