// The vocabulary every kernel backend (optimized/cpu, optimized/cuda) speaks:
// a layer's shape, the reductions and pooling modes, and a plan in CSR form.
// Plain structs of shapes and raw pointers, no library types, so the CUDA
// headers and the CPU headers share one definition.
#pragma once

#include <cstdint>

namespace kvscope::kern {

/// Shapes of one layer as the kernels see it: q [q_heads, tokens, d],
/// k and v [kv_heads, tokens, d], row-major and contiguous.
struct LayerShape {
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  std::int64_t tokens = 0;
  int group() const { return kv_heads > 0 ? q_heads / kv_heads : 0; }
};

enum class Reduce { kSum, kMean, kMax };
enum class Pool { kNone, kAvg, kMax };

/// A plan for every kv head, concatenated. Slot r (global, 0..offsets[H]) has
/// entries [row_ptr[r], row_ptr[r+1]) of token/coef_k/coef_v; its tokens index
/// its own head's rows. `rotate` (nullable) is, per slot, the RoPE shift in
/// positions applied to the merged key (re-rotated caches), 0 = none.
/// Pointers are host memory for the CPU kernels, device memory for CUDA's.
struct RaggedPlan {
  int heads = 0;
  const std::int64_t* offsets = nullptr;  // heads + 1
  const std::int64_t* row_ptr = nullptr;  // offsets[heads] + 1
  const std::int64_t* token = nullptr;
  const float* coef_k = nullptr;
  const float* coef_v = nullptr;
  const std::int64_t* rotate = nullptr;
  double rope_theta = 10000.0;
};

}  // namespace kvscope::kern
