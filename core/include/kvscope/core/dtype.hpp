// Storage dtypes of traces and caches. Compute is fp32 (backends) or double
// (reference); storage is fp32, fp16 or bf16. Conversions use Eigen's half and
// bfloat16 (round-to-nearest-even), so no bit twiddling is written here.
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "kvscope/core/dtype_kind.hpp"

namespace kvscope {

inline std::uint16_t float_to_f16_bits(float x) {
  return Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(x));
}
inline float f16_bits_to_float(std::uint16_t b) {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(b));
}
inline std::uint16_t float_to_bf16_bits(float x) {
  return Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(x));
}
inline float bf16_bits_to_float(std::uint16_t b) {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(b));
}

/// Rounds a float to the nearest value representable in `t` (identity for fp32).
inline float round_to_dtype(float x, DType t) {
  switch (t) {
    case DType::kF32: return x;
    case DType::kF16: return f16_bits_to_float(float_to_f16_bits(x));
    case DType::kBF16: return bf16_bits_to_float(float_to_bf16_bits(x));
  }
  return x;
}

}  // namespace kvscope
