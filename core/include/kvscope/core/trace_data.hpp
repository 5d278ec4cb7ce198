// In-memory model of a trace (schema v1, docs/trace-format.md): metadata plus
// one LayerData per layer. Readers stream layers one at a time; nothing here
// knows about HDF5.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "kvscope/core/dtype.hpp"
#include "kvscope/core/tensor.hpp"

namespace kvscope {

struct TraceMeta {
  std::string producer = "kvscope";
  std::string model = "unknown";
  int layers = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  std::int64_t prompt_len = 0;    // T
  std::int64_t decode_steps = 0;  // S
  double rope_theta = 10000.0;
  std::string rope_scaling = "none";
  std::string rope_style = "neox";  // rotate-half pairs (i, i + d/2), as HF Llama
  bool keys_post_rope = true;
  DType dtype = DType::kF32;
  bool has_decode_outputs = false;  // decode/o recorded
  bool has_attn_colsum = false;     // prefill/attn_colsum recorded

  int group_size() const { return kv_heads > 0 ? q_heads / kv_heads : 0; }
};

/// One layer. Shapes: q [q_heads, T|S, d]; k, v [kv_heads, T|S, d];
/// decode_o [q_heads, S, d]; attn_colsum [q_heads, T].
struct LayerData {
  Tensor prefill_q, prefill_k, prefill_v;
  Tensor decode_q, decode_k, decode_v;
  std::optional<Tensor> decode_o;
  std::optional<Tensor> attn_colsum;
};

}  // namespace kvscope
