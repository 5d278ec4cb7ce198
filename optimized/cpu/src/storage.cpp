#include "kvscope/opt/cpu/storage.hpp"

#include <cstring>

#include "simd.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kvscope::opt::cpu {

void load_row(const float* src, std::int64_t n, float* dst) { std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float)); }

void load_row(const f16* src, std::int64_t n, float* dst) {
  std::int64_t i = 0;
#if KVSCOPE_CPU_AVX2 && defined(__F16C__)
  // Eigen 3.4 only uses F16C under clang; convert eight at a time here.
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, detail::load8(src + i));
#endif
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}

void load_row(const bf16* src, std::int64_t n, float* dst) {
  // bf16 is the top half of an fp32: widen the bits.
  std::int64_t i = 0;
#if KVSCOPE_CPU_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, detail::load8(src + i));
#endif
  for (; i < n; ++i) {
    std::uint16_t b;
    std::memcpy(&b, src + i, sizeof b);
    const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
    std::memcpy(dst + i, &u, sizeof u);
  }
}

void store_row(const float* src, std::int64_t n, float* dst) { std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float)); }

void store_row(const float* src, std::int64_t n, f16* dst) {
  std::int64_t i = 0;
#if defined(__F16C__) && defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // vcvtps2ph keeps a NaN's payload; Eigen's conversion makes it 0x7e00 with the sign.
    const __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
    const __m128i quiet = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000))), _mm_set1_epi16(0x7e00));
    h = _mm_blendv_epi8(h, quiet, nan16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = from_f32<f16>(src[i]);
}

void store_row(const float* src, std::int64_t n, bf16* dst) {
  // Round to nearest even on the bits (Eigen's rule); a NaN becomes a quiet
  // NaN with its sign. Eight at a time under AVX2 (GCC's own vectorisation of
  // the scalar loop below ran at half the speed of the fp16 path).
  std::int64_t i = 0;
#if defined(__AVX2__)
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000),
                half = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), sign = _mm256_set1_epi32(0x8000),
                quiet = _mm256_set1_epi32(0x7fc0);
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, half), _mm256_and_si256(hi, one)), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);  // both sides < 2^31: signed compare is exact
    const __m256i q = _mm256_or_si256(_mm256_and_si256(hi, sign), quiet);
    const __m256i r = _mm256_blendv_epi8(rounded, q, nan);  // eight values < 2^16
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
  }
#endif
  for (; i < n; ++i) {
    std::uint32_t u;
    std::memcpy(&u, src + i, sizeof u);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const auto rounded = static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    dst[i] = Eigen::numext::bit_cast<bf16>(nan ? static_cast<std::uint16_t>((u >> 16 & 0x8000u) | 0x7fc0u) : rounded);
  }
}

void stream_copy(void* dst, const void* src, std::size_t bytes) {
#if defined(__x86_64__)
  if (reinterpret_cast<std::uintptr_t>(dst) % 16 == 0 && bytes % 16 == 0) {
    auto* d = static_cast<__m128i*>(dst);
    const auto* s = static_cast<const __m128i*>(src);
    for (std::size_t i = 0; i < bytes / 16; ++i) _mm_stream_si128(d + i, _mm_loadu_si128(s + i));
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

}  // namespace kvscope::opt::cpu
