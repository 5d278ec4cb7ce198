// The storage dtype as a value: its enum, name, parsing and size. No Eigen,
// so CUDA sources and framework-free kernel headers can name a dtype
// (conversions live in dtype.hpp).
#pragma once

#include <optional>
#include <string_view>

namespace kvscope {

enum class DType { kF32, kF16, kBF16 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
  }
  return "?";
}

/// Accepts the canonical names and the short forms fp32/f32, fp16/f16/half, bf16.
inline std::optional<DType> parse_dtype(std::string_view s) {
  if (s == "float32" || s == "fp32" || s == "f32") return DType::kF32;
  if (s == "float16" || s == "fp16" || s == "f16" || s == "half") return DType::kF16;
  if (s == "bfloat16" || s == "bf16") return DType::kBF16;
  return std::nullopt;
}

inline int dtype_bytes(DType t) { return t == DType::kF32 ? 4 : 2; }

}  // namespace kvscope
