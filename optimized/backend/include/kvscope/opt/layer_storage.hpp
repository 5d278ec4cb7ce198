// One trace layer in storage precision: what the optimized backends read.
// Values are stored in the trace's dtype (fp32, fp16 or bf16) exactly as
// recorded; kernels convert to fp32 as they load.
#pragma once

#include <cstdint>
#include <vector>

#include "kvscope/core/trace_data.hpp"
#include "kvscope/opt/cpu/storage.hpp"

namespace kvscope::opt {

class BackendCoupling;

/// A buffer of one storage dtype (one vector per type keeps the element types honest).
class StorageBuffer {
 public:
  StorageBuffer() = default;
  StorageBuffer(DType t, std::int64_t n);
  DType dtype() const { return dtype_; }
  std::int64_t size() const;
  template <class S>
  S* data();
  template <class S>
  const S* data() const;
  /// Element i as fp32 (tests and comparisons; kernels use data<S>()).
  float get(std::int64_t i) const;
  void set(std::int64_t i, float x);  // rounds to the dtype
  /// Fills with NaN (fp32/fp16/bf16 all have one): anti-vacuity poisoning.
  void poison();

 private:
  DType dtype_ = DType::kF32;
  std::vector<float> f32_;
  std::vector<cpu::f16> f16_;
  std::vector<cpu::bf16> bf16_;
};

/// Converts a float tensor to `t` storage (exact for values the trace holds).
StorageBuffer pack(const Tensor& t, DType dtype);

struct LayerStorage {
  const TraceMeta* meta = nullptr;
  int layer = 0;
  cpu::LayerShape shape;           // prefill: q [q_heads, T, d], k and v [kv_heads, T, d]
  StorageBuffer q, k, v;
  std::vector<float> attn_colsum;  // [q_heads, T], empty when the trace has none
  /// The method's own first-pass state (BackendMethod::coupling), or nullptr.
  const BackendCoupling* coupling = nullptr;
};

/// The prefill part of a layer in the trace's storage dtype.
LayerStorage pack_layer(const TraceMeta& meta, int layer, const LayerData& data);

}  // namespace kvscope::opt
