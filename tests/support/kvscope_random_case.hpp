// Random one-layer cases for property tests (RapidCheck generators). Values
// come from a coarse grid (exact ties), a fine range (near-ties) or a set of
// special values (zeros, subnormal-small, large enough to saturate softmax),
// rounded to the case's storage dtype; budgets sit around the edges.
#pragma once

#include <rapidcheck.h>

#include <vector>

#include "kvscope/core/dtype.hpp"
#include "kvscope/core/trace_data.hpp"

namespace kvscope::tests {

struct Case {
  TraceMeta meta;
  LayerData layer;
  std::int64_t budget = 0;
};

/// What random_case draws from.
struct CaseShape {
  int max_kv_heads = 2;
  std::vector<int> head_dims = {2, 4, 6, 8};
  std::int64_t max_tokens = 24;
  std::vector<DType> dtypes = {DType::kF32};
};

enum class Values { kGrid, kFine, kSpecial };

inline float random_value(Values kind) {
  switch (kind) {
    case Values::kGrid: return static_cast<float>(*rc::gen::inRange(-3, 4)) * 0.5f;
    case Values::kFine: return static_cast<float>(*rc::gen::inRange(-4000, 4001)) / 1000.0f;
    case Values::kSpecial:
      return *rc::gen::element(0.0f, -0.0f, 1e-38f, -1e-38f, 1e-3f, 30.0f, -30.0f, 1.0f, -1.0f);
  }
  return 0.0f;
}

inline Tensor random_tensor(std::vector<std::int64_t> shape, Values kind, DType dtype) {
  Tensor t(std::move(shape));
  for (float& x : t.data) x = round_to_dtype(random_value(kind), dtype);
  return t;
}

inline Case random_case(const CaseShape& shape = {}) {
  Case c;
  TraceMeta& m = c.meta;
  m.layers = 1;
  m.dtype = *rc::gen::elementOf(shape.dtypes);
  m.kv_heads = *rc::gen::inRange(1, shape.max_kv_heads + 1);
  m.q_heads = m.kv_heads * *rc::gen::inRange(1, 9);  // GQA group sizes 1..8
  m.head_dim = *rc::gen::elementOf(shape.head_dims);
  m.prompt_len = *rc::gen::inRange<std::int64_t>(1, shape.max_tokens + 1);
  m.decode_steps = *rc::gen::inRange<std::int64_t>(1, 5);
  const Values kind = *rc::gen::element(Values::kGrid, Values::kFine, Values::kSpecial);
  const std::int64_t T = m.prompt_len, S = m.decode_steps, d = m.head_dim;
  c.layer.prefill_q = random_tensor({m.q_heads, T, d}, kind, m.dtype);
  c.layer.prefill_k = random_tensor({m.kv_heads, T, d}, kind, m.dtype);
  c.layer.prefill_v = random_tensor({m.kv_heads, T, d}, kind, m.dtype);
  c.layer.decode_q = random_tensor({m.q_heads, S, d}, kind, m.dtype);
  c.layer.decode_k = random_tensor({m.kv_heads, S, d}, kind, m.dtype);
  c.layer.decode_v = random_tensor({m.kv_heads, S, d}, kind, m.dtype);
  // Budgets around the edges: 0, 1, small, about T, and covering T + S.
  c.budget = *rc::gen::oneOf(rc::gen::inRange<std::int64_t>(0, 3), rc::gen::inRange<std::int64_t>(0, T + 1),
                             rc::gen::inRange<std::int64_t>(T - 1, T + S + 2));
  return c;
}

}  // namespace kvscope::tests
