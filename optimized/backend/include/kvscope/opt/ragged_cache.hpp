// A layer's compressed cache in varlen layout (every kv head's slots back to
// back), built by the backend from the layer's plans, and decode attention over it.
#pragma once

#include <cstdint>
#include <vector>

#include "kvscope/core/plan.hpp"
#include "kvscope/opt/cpu/ragged.hpp"
#include "kvscope/opt/layer_storage.hpp"

namespace kvscope::opt {

struct RaggedCache {
  int heads = 0;
  int head_dim = 0;
  std::vector<std::int64_t> offsets;  // heads + 1: head h holds rows [offsets[h], offsets[h+1])
  StorageBuffer k, v;                 // [offsets[heads], head_dim]
  std::vector<std::int64_t> count;    // per row: original tokens the slot stands for
  std::int64_t rows() const { return offsets.empty() ? 0 : offsets.back(); }
  /// log(count) per row: the optional logit bias of merged slots.
  std::vector<float> log_count_bias() const;
};

/// Every kv head's plan concatenated in CSR form: the arrays a cpu::RaggedPlan
/// views. Slot r's `rotate` is the RoPE shift of a re-rotated slot (its
/// position minus its first token), else 0.
struct FlatPlans {
  std::vector<std::int64_t> offsets{0}, row_ptr{0}, token, rotate, count;
  std::vector<float> coef_k, coef_v;
  cpu::RaggedPlan view(double rope_theta) const {
    return {static_cast<int>(offsets.size()) - 1, offsets.data(), row_ptr.data(), token.data(), coef_k.data(),
            coef_v.data(), rotate.data(), rope_theta};
  }
};
FlatPlans flatten(const std::vector<Plan>& plans);

/// Applies every kv head's plan (over the layer's T prompt tokens) to its K and V
/// in the storage dtype: gather, merge and re-rotation in one kernel. With
/// `poison`, outputs are NaN-filled first so an unwritten row cannot pass.
RaggedCache compact(const LayerStorage& layer, const std::vector<Plan>& plans, double rope_theta, bool poison = true);

/// Single-query attention of every q head over its kv head's rows. q: [q_heads, d].
std::vector<float> decode_attention(const RaggedCache& cache, const std::vector<float>& q, int q_heads,
                                    bool log_count_bias);

}  // namespace kvscope::opt
