#include "kvscope/opt/layer_storage.hpp"

#include <limits>

namespace kvscope::opt {

StorageBuffer::StorageBuffer(DType t, std::int64_t n) : dtype_(t) {
  const auto count = static_cast<std::size_t>(n);
  switch (t) {
    case DType::kF32: f32_.resize(count); break;
    case DType::kF16: f16_.resize(count); break;
    case DType::kBF16: bf16_.resize(count); break;
  }
}

std::int64_t StorageBuffer::size() const {
  return static_cast<std::int64_t>(dtype_ == DType::kF32 ? f32_.size() : dtype_ == DType::kF16 ? f16_.size() : bf16_.size());
}

template <>
float* StorageBuffer::data<float>() { return f32_.data(); }
template <>
cpu::f16* StorageBuffer::data<cpu::f16>() { return f16_.data(); }
template <>
cpu::bf16* StorageBuffer::data<cpu::bf16>() { return bf16_.data(); }
template <>
const float* StorageBuffer::data<float>() const { return f32_.data(); }
template <>
const cpu::f16* StorageBuffer::data<cpu::f16>() const { return f16_.data(); }
template <>
const cpu::bf16* StorageBuffer::data<cpu::bf16>() const { return bf16_.data(); }

float StorageBuffer::get(std::int64_t i) const {
  const auto k = static_cast<std::size_t>(i);
  return dtype_ == DType::kF32 ? f32_[k] : dtype_ == DType::kF16 ? cpu::to_f32(f16_[k]) : cpu::to_f32(bf16_[k]);
}

void StorageBuffer::set(std::int64_t i, float x) {
  const auto k = static_cast<std::size_t>(i);
  switch (dtype_) {
    case DType::kF32: f32_[k] = x; break;
    case DType::kF16: f16_[k] = cpu::from_f32<cpu::f16>(x); break;
    case DType::kBF16: bf16_[k] = cpu::from_f32<cpu::bf16>(x); break;
  }
}

void StorageBuffer::poison() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (std::int64_t i = 0; i < size(); ++i) set(i, nan);
}

StorageBuffer pack(const Tensor& t, DType dtype) {
  StorageBuffer b(dtype, t.size());
  for (std::int64_t i = 0; i < t.size(); ++i) b.set(i, t.data[static_cast<std::size_t>(i)]);
  return b;
}

LayerStorage pack_layer(const TraceMeta& meta, int layer, const LayerData& data) {
  LayerStorage s;
  s.meta = &meta;
  s.layer = layer;
  s.shape = {meta.q_heads, meta.kv_heads, meta.head_dim, meta.prompt_len};
  s.q = pack(data.prefill_q, meta.dtype);
  s.k = pack(data.prefill_k, meta.dtype);
  s.v = pack(data.prefill_v, meta.dtype);
  if (data.attn_colsum) s.attn_colsum = data.attn_colsum->data;
  return s;
}

}  // namespace kvscope::opt
