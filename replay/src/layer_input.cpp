#include "kvscope/replay/layer_input.hpp"

namespace kvscope::replay {

ref::MatX head_matrix(const Tensor& t, std::int64_t h) {
  const std::int64_t rows = t.dim(1), cols = t.dim(2);
  return ref::to_matrix({t.data.data() + h * rows * cols, static_cast<std::size_t>(rows * cols)}, rows, cols);
}

ref::LayerInput make_layer_input(const TraceMeta& meta, int layer, const LayerData& data) {
  ref::LayerInput in;
  in.meta = &meta;
  in.layer = layer;
  for (int h = 0; h < meta.q_heads; ++h) in.q.push_back(head_matrix(data.prefill_q, h));
  for (int h = 0; h < meta.kv_heads; ++h) {
    in.k.push_back(head_matrix(data.prefill_k, h));
    in.v.push_back(head_matrix(data.prefill_v, h));
  }
  if (data.attn_colsum) {
    const Tensor& c = *data.attn_colsum;
    for (int h = 0; h < meta.q_heads; ++h) {
      ref::VecX v(c.dim(1));
      for (std::int64_t t = 0; t < c.dim(1); ++t) v[t] = c.at(h, t);
      in.attn_colsum.push_back(std::move(v));
    }
  }
  return in;
}

ref::MatX full_rows(const Tensor& prefill, const Tensor& decode, std::int64_t h) {
  ref::MatX m(prefill.dim(1) + decode.dim(1), prefill.dim(2));
  m.topRows(prefill.dim(1)) = head_matrix(prefill, h);
  if (decode.dim(1) > 0) m.bottomRows(decode.dim(1)) = head_matrix(decode, h);
  return m;
}

}  // namespace kvscope::replay
