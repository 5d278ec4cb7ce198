// Conversion of one trace layer to the reference's double-precision view.
#pragma once

#include "kvscope/core/trace_data.hpp"
#include "kvscope/reference/method.hpp"

namespace kvscope::replay {

/// Rows of head h of a rank-3 [heads, tokens, d] tensor as a double matrix.
ref::MatX head_matrix(const Tensor& t, std::int64_t h);

/// Prefill view of a layer (what methods see).
ref::LayerInput make_layer_input(const TraceMeta& meta, int layer, const LayerData& data);

/// Full K (or V) of kv head h: prompt rows then decode rows, [T + S, d].
ref::MatX full_rows(const Tensor& prefill, const Tensor& decode, std::int64_t h);

}  // namespace kvscope::replay
