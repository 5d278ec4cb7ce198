// Double-precision softmax attention, the spec every backend is compared with.
//   o = softmax(q K^T / sqrt(d) + b) V
// Softmax subtracts the maximum logit first (no overflow for any finite input).
// GQA: query head h reads kv head h / (q_heads / kv_heads) (contiguous groups,
// as HF's repeat_kv).
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <span>

namespace kvscope::ref {

using MatX = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using VecX = Eigen::VectorXd;

/// Numerically stable softmax of a logit vector. -inf entries get probability 0;
/// throws Error(kBadNumber) if every entry is -inf or any is NaN/+inf.
VecX softmax(const VecX& logits);

/// Attention of one query over n keys/values (rows of K, V).
struct AttentionResult {
  VecX output;  // d
  VecX probs;   // n, sums to 1
};
/// `log_bias` (optional, size n) is added to the logits, e.g. log(count) for merged slots.
AttentionResult attend(const VecX& q, const MatX& K, const MatX& V,
                       const VecX* log_bias = nullptr);

/// Causal attention of T queries over the first T keys: row t attends to keys
/// 0..offset+t. Keys may be longer than queries (`offset` = first query's key index).
MatX causal_attention(const MatX& Q, const MatX& K, const MatX& V, std::int64_t offset = 0);

/// Column sums of the causal attention matrix (accumulated attention per key).
VecX causal_attention_colsum(const MatX& Q, const MatX& K, std::int64_t offset = 0);

/// kv head that query head h reads under GQA.
inline int kv_head_of(int q_head, int q_heads, int kv_heads) { return q_head / (q_heads / kv_heads); }

/// Rotates `x` (NeoX rotate-half convention: pairs (i, i + d/2), frequency
/// theta^(-2i/d)) by `delta` positions. R(a) R(b) = R(a + b), so a key rotated at
/// position p moves to position p + delta.
VecX rope_rotate(const VecX& x, double delta, double theta);

/// Helpers to view rows of a float [heads, tokens, d] buffer as double matrices.
MatX to_matrix(std::span<const float> data, std::int64_t rows, std::int64_t cols);

}  // namespace kvscope::ref
