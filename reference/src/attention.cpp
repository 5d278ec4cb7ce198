#include "kvscope/reference/attention.hpp"

#include <cmath>
#include <limits>

#include "kvscope/core/error.hpp"

namespace kvscope::ref {

VecX softmax(const VecX& logits) {
  if (logits.size() == 0) throw Error(ErrorKind::kBadNumber, "softmax of an empty set of logits");
  double mx = -std::numeric_limits<double>::infinity();
  for (Eigen::Index i = 0; i < logits.size(); ++i) {
    const double z = logits[i];
    if (std::isnan(z) || z == std::numeric_limits<double>::infinity())
      throw Error(ErrorKind::kBadNumber, "softmax: logit " + std::to_string(i) + " is NaN or +inf");
    mx = std::max(mx, z);
  }
  if (mx == -std::numeric_limits<double>::infinity())
    throw Error(ErrorKind::kBadNumber, "softmax: every logit is -inf (fully masked row)");
  // std::exp, not Eigen's vectorised exp: it clamps -inf to a tiny positive value.
  const VecX e = (logits.array() - mx).unaryExpr([](double z) { return std::exp(z); });
  return e / e.sum();
}

AttentionResult attend(const VecX& q, const MatX& K, const MatX& V, const VecX* log_bias) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size()));
  VecX logits = (K * q) * scale;
  if (log_bias) logits += *log_bias;
  AttentionResult r;
  r.probs = softmax(logits);
  r.output = V.transpose() * r.probs;
  return r;
}

MatX causal_attention(const MatX& Q, const MatX& K, const MatX& V, std::int64_t offset) {
  MatX out(Q.rows(), V.cols());
  for (Eigen::Index t = 0; t < Q.rows(); ++t) {
    const Eigen::Index n = offset + t + 1;
    const AttentionResult r = attend(Q.row(t).transpose(), K.topRows(n), V.topRows(n));
    out.row(t) = r.output.transpose();
  }
  return out;
}

VecX causal_attention_colsum(const MatX& Q, const MatX& K, std::int64_t offset) {
  VecX sum = VecX::Zero(K.rows());
  const double scale = 1.0 / std::sqrt(static_cast<double>(Q.cols()));
  for (Eigen::Index t = 0; t < Q.rows(); ++t) {
    const Eigen::Index n = offset + t + 1;
    sum.head(n) += softmax((K.topRows(n) * Q.row(t).transpose()) * scale);
  }
  return sum;
}

VecX rope_rotate(const VecX& x, double delta, double theta) {
  const Eigen::Index d = x.size();
  if (d % 2 != 0) throw Error(ErrorKind::kInternal, "rope_rotate: head dim must be even");
  const Eigen::Index half = d / 2;
  VecX y(d);
  for (Eigen::Index i = 0; i < half; ++i) {
    const double freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
    const double c = std::cos(delta * freq), s = std::sin(delta * freq);
    y[i] = x[i] * c - x[i + half] * s;
    y[i + half] = x[i + half] * c + x[i] * s;
  }
  return y;
}

MatX to_matrix(std::span<const float> data, std::int64_t rows, std::int64_t cols) {
  MatX m(rows, cols);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) m(r, c) = static_cast<double>(data[static_cast<std::size_t>(r * cols + c)]);
  return m;
}

}  // namespace kvscope::ref
