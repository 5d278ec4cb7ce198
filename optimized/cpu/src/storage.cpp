#include "kvscope/opt/cpu/storage.hpp"

#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace kvscope::opt::cpu {

void load_row(const float* src, std::int64_t n, float* dst) { std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float)); }

void load_row(const f16* src, std::int64_t n, float* dst) {
  std::int64_t i = 0;
#if defined(__F16C__)
  // Eigen 3.4 only uses F16C under clang; convert eight at a time here.
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}

void load_row(const bf16* src, std::int64_t n, float* dst) {
  // bf16 is the top half of an fp32: widen the bits (vectorises to shifts).
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint16_t b;
    std::memcpy(&b, src + i, sizeof b);
    const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
    std::memcpy(dst + i, &u, sizeof u);
  }
}

}  // namespace kvscope::opt::cpu
