// Per-element math shared by the CPU and CUDA backends (KVSCOPE_HD): one
// definition of each formula, so both backends round the same way. fp32
// compute; RoPE angles in double (a float angle at position 8k is off by ~1e-3 rad).
#pragma once

#include <cmath>
#include <cstdint>

#include "kvscope/core/hd.hpp"

namespace kvscope::math {

/// Running maximum and normaliser of a softmax folded one logit at a time
/// (the online softmax of FlashAttention / flash-decoding).
struct OnlineSoftmax {
  float max = -INFINITY;
  float sum = 0.0f;
};

/// Folds logit `x` into `s`. Returns the factor the caller applies to its
/// running accumulator; `*weight` receives the new term's weight exp(x - max).
KVSCOPE_HD float online_softmax_push(OnlineSoftmax& s, float x, float* weight) {
  if (x <= s.max) {
    *weight = expf(x - s.max);
    s.sum += *weight;
    return 1.0f;
  }
  const float rescale = s.max == -INFINITY ? 0.0f : expf(s.max - x);
  s.sum = s.sum * rescale + 1.0f;
  s.max = x;
  *weight = 1.0f;
  return rescale;
}

/// Logit bias of a slot standing for `count` original tokens: log(count)
/// (a merged slot competes as `count` copies of its key would).
KVSCOPE_HD float log_count_bias(std::int64_t count) {
  return count > 1 ? logf(static_cast<float>(count)) : 0.0f;
}

/// Cosine similarity from a dot product and the two squared norms, clamped to
/// [-1, 1] (ref::key_cosine's contract): two zero vectors are identical (1),
/// one zero vector has no direction in common with anything (0).
KVSCOPE_HD float cosine(float dot, float norm2_a, float norm2_b) {
  if (norm2_a == 0.0f && norm2_b == 0.0f) return 1.0f;
  if (norm2_a == 0.0f || norm2_b == 0.0f) return 0.0f;
  const float c = dot / (sqrtf(norm2_a) * sqrtf(norm2_b));
  return c < -1.0f ? -1.0f : c > 1.0f ? 1.0f : c;
}

/// The exponent of gaussian_weight, -dist2 / (2 sigma^2) (a kernel that
/// takes its exps in vectors computes the same exponents).
KVSCOPE_HD float gaussian_exponent(float dist2, float sigma) { return -dist2 / (2.0f * sigma * sigma); }

/// Gaussian kernel weight exp(-dist2 / (2 sigma^2)) (KVMerger eq. 4 weights);
/// 1 when dist2 = 0 (the pivot itself, even if 2 sigma^2 underflows) or when
/// sigma is not positive (every key at the pivot), as ref::kvmerger_weights.
KVSCOPE_HD float gaussian_weight(float dist2, float sigma) {
  return dist2 == 0.0f || !(sigma > 0.0f) ? 1.0f : expf(gaussian_exponent(dist2, sigma));
}

/// Power-of-two exponent e with max_abs * 2^-e in [0.5, 1) (0 for 0): scaling
/// by 2^-e is exact, so squares of tiny or huge vectors stay representable.
KVSCOPE_HD int scale_exponent(float max_abs) {
  int e = 0;
  if (max_abs > 0.0f && max_abs < INFINITY) frexpf(max_abs, &e);
  return e;
}

/// EMS similarity of two items from their unit-normalised rows' cosines:
/// cos k (keys only) or cos k * cos v (ref::ems_similarity; a zero row has
/// cosine 0 with everything, so pass 0 for it).
KVSCOPE_HD float ems_similarity(float cos_k, float cos_v, bool keys_only) {
  return keys_only ? cos_k : cos_k * cos_v;
}

/// CaM's merge probability p = clamp(a / denom, 0, 1); 0/0 -> 0, x/0 -> 1
/// (the NaN/Inf guards of kvpress and the authors' streaming code).
KVSCOPE_HD float cam_merge_probability(float a, float denom) {
  const float p = a / denom;
  return p != p ? 0.0f : p < 0.0f ? 0.0f : p > 1.0f ? 1.0f : p;
}

/// Rotates the NeoX rotate-half pair (x[i], x[i + d/2]) of a d-dim key by
/// `delta` positions under base `theta` (frequency theta^(-2i/d)).
KVSCOPE_HD void rope_rotate_pair(float& lo, float& hi, int i, int d, double delta, double theta) {
  const double freq = pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
  const double c = cos(delta * freq), s = sin(delta * freq);
  const double a = lo, b = hi;
  lo = static_cast<float>(a * c - b * s);
  hi = static_cast<float>(b * c + a * s);
}

}  // namespace kvscope::math
