// The one tolerance table of backend-vs-reference checks (docs/verification.md,
// "Differential checks"), keyed by the storage dtype of the trace.
#pragma once

#include "kvscope/core/dtype.hpp"

namespace kvscope {

struct Tolerance {
  /// Numbers (compressed K/V, attention outputs): relative L2 error against
  /// the double reference, and the minimum cosine.
  double rel_l2 = 0;
  double cosine_min = 0;
  /// err(opt) <= k * err(naive) + floor, naive = the reference rounded to the
  /// storage dtype (the best a storage-precision result can be).
  double k = 2.0;
  double floor = 0;
  /// Selections: a decision may differ from the reference only for tokens
  /// whose reference score lies within delta * max|score| of the boundary.
  double score_delta = 0;
};

/// Scores are fp32 compute over the same stored values for every dtype (the
/// reference reads exactly those values), so score_delta does not depend on
/// the dtype; numbers do, through the rounding of the stored cache
/// (unit roundoff: fp16 4.9e-4, bf16 3.9e-3). The floor is the fp32 compute
/// error of the backend (d = 128 dot products, softmax), the same for every dtype.
/// Unit roundoff of a storage dtype (half an ulp of 1).
inline double unit_roundoff(DType t) {
  return t == DType::kF16 ? 0x1p-11 : t == DType::kBF16 ? 0x1p-8 : 0x1p-24;
}

inline Tolerance tolerance(DType storage) {
  switch (storage) {
    case DType::kF16: return {1e-3, 0.9999, 2.0, 1e-5, 1e-4};
    case DType::kBF16: return {1e-2, 0.999, 2.0, 1e-5, 1e-4};
    case DType::kF32: break;
  }
  return {1e-5, 0.999999, 2.0, 1e-5, 1e-4};
}

}  // namespace kvscope
