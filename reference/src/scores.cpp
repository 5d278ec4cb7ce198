#include "kvscope/reference/scores.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "kvscope/core/error.hpp"

namespace kvscope::ref {

Reduce parse_reduce(const std::string& text, const std::string& param) {
  if (text == "sum") return Reduce::kSum;
  if (text == "mean") return Reduce::kMean;
  if (text == "max") return Reduce::kMax;
  throw Error(ErrorKind::kUsage, "'" + param + "' must be sum, mean or max, not '" + text + "'");
}

Pool parse_pool(const std::string& text, const std::string& param) {
  if (text == "none") return Pool::kNone;
  if (text == "avg") return Pool::kAvg;
  if (text == "max") return Pool::kMax;
  throw Error(ErrorKind::kUsage, "'" + param + "' must be none, avg or max, not '" + text + "'");
}

MatX window_attention(const MatX& Q, const MatX& K, std::int64_t window) {
  const std::int64_t T = K.rows(), w = std::clamp<std::int64_t>(window, 0, T);
  const double scale = 1.0 / std::sqrt(static_cast<double>(K.cols()));
  MatX A = MatX::Zero(w, T);
  for (std::int64_t i = 0; i < w; ++i) {
    const std::int64_t t = T - w + i;  // the query's own index: it sees keys 0..t
    const VecX logits = K.topRows(t + 1) * Q.row(t).transpose() * scale;
    A.row(i).head(t + 1) = softmax(logits).transpose();
  }
  return A;
}

VecX window_scores(const MatX& Q, const MatX& K, std::int64_t window, Reduce rows) {
  const MatX A = window_attention(Q, K, window);
  if (A.rows() == 0) return VecX::Zero(K.rows());
  switch (rows) {
    case Reduce::kSum: return A.colwise().sum().transpose();
    case Reduce::kMean: return A.colwise().mean().transpose();
    case Reduce::kMax: return A.colwise().maxCoeff().transpose();
  }
  return {};
}

VecX accumulated_attention(const LayerInput& in, int q_head, bool per_query) {
  const auto h = static_cast<std::size_t>(q_head);
  const int kv = kv_head_of(q_head, static_cast<int>(in.q.size()), static_cast<int>(in.k.size()));
  VecX acc = in.attn_colsum.empty() ? causal_attention_colsum(in.q[h], in.k[static_cast<std::size_t>(kv)])
                                    : in.attn_colsum[h];
  if (per_query) {
    const std::int64_t T = acc.size();
    for (std::int64_t j = 0; j < T; ++j) acc[j] /= static_cast<double>(T - j);
  }
  return acc;
}

VecX pool1d(const VecX& x, std::int64_t kernel, Pool pool) {
  if (pool == Pool::kNone || kernel == 1) return x;
  if (kernel < 1 || kernel % 2 == 0)
    throw Error(ErrorKind::kUsage, "pooling kernel must be odd and >= 1, not " + std::to_string(kernel));
  const std::int64_t n = x.size(), half = kernel / 2;
  VecX y(n);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t lo = std::max<std::int64_t>(0, i - half), hi = std::min(n - 1, i + half);
    if (pool == Pool::kAvg) {
      y[i] = x.segment(lo, hi - lo + 1).sum() / static_cast<double>(kernel);  // padding counts as zeros
    } else {
      y[i] = x.segment(lo, hi - lo + 1).maxCoeff();
    }
  }
  return y;
}

VecX group_reduce(const std::vector<VecX>& per_q_head, int kv_head, int q_heads, int kv_heads, Reduce r) {
  const int g = q_heads / kv_heads;
  VecX out = per_q_head[static_cast<std::size_t>(kv_head * g)];
  for (int i = 1; i < g; ++i) {
    const VecX& s = per_q_head[static_cast<std::size_t>(kv_head * g + i)];
    if (r == Reduce::kMax)
      out = out.cwiseMax(s);
    else
      out += s;
  }
  if (r == Reduce::kMean) out /= static_cast<double>(g);
  return out;
}

Selection top_k(const VecX& scores, std::span<const std::int64_t> candidates, std::int64_t k) {
  for (std::int64_t j : candidates)
    if (std::isnan(scores[j])) throw Error(ErrorKind::kBadNumber, "score of token " + std::to_string(j) + " is NaN");
  // The total order: higher score first, the lower index on equal scores.
  const auto better = [&](std::int64_t a, std::int64_t b) { return scores[a] != scores[b] ? scores[a] > scores[b] : a < b; };
  std::vector<std::int64_t> order(candidates.begin(), candidates.end());
  const auto kk = static_cast<std::size_t>(std::clamp<std::int64_t>(k, 0, static_cast<std::int64_t>(order.size())));
  // Only the k best need to be found (a partition, not a full sort): the
  // first kk of `order` are they; the rest follow in any order.
  const auto cut = order.begin() + static_cast<std::ptrdiff_t>(kk);
  if (kk > 0 && kk < order.size()) std::nth_element(order.begin(), cut - 1, order.end(), better);
  Selection s;
  s.kept.assign(order.begin(), cut);
  if (kk > 0 && kk < order.size()) {
    const double min_kept = scores[order[kk - 1]];  // the k-th best (nth_element put it there)
    s.margin = min_kept - scores[*std::min_element(cut, order.end(), better)];      // minus the best left out
    s.ties = std::count_if(cut, order.end(), [&](std::int64_t j) { return scores[j] == min_kept; });
  }
  std::sort(s.kept.begin(), s.kept.end());
  return s;
}

std::vector<std::int64_t> index_range(std::int64_t begin, std::int64_t end) {
  std::vector<std::int64_t> r(static_cast<std::size_t>(std::max<std::int64_t>(0, end - begin)));
  std::iota(r.begin(), r.end(), begin);
  return r;
}

std::vector<std::int64_t> complement(std::int64_t n, std::span<const std::int64_t> excluded) {
  // Sorted excluded tokens (sinks and windows, the usual case): the gaps
  // between them, each filled in order without a mask.
  if (std::is_sorted(excluded.begin(), excluded.end())) {
    std::vector<std::int64_t> rest;
    rest.reserve(static_cast<std::size_t>(std::max<std::int64_t>(n, 0)));
    const auto gap = [&](std::int64_t from, std::int64_t to) {  // tokens [from, to), one iota
      if (to <= from) return;
      rest.resize(rest.size() + static_cast<std::size_t>(to - from));
      std::iota(rest.end() - (to - from), rest.end(), from);
    };
    std::int64_t from = 0;
    for (std::int64_t x : excluded) {
      gap(from, std::min(x, n));
      from = std::max(from, x + 1);
    }
    gap(from, n);
    return rest;
  }
  std::vector<char> out_of(static_cast<std::size_t>(n), 0);
  for (std::int64_t j : excluded) out_of[static_cast<std::size_t>(j)] = 1;
  std::vector<std::int64_t> rest;
  rest.reserve(static_cast<std::size_t>(std::max<std::int64_t>(0, n - static_cast<std::int64_t>(excluded.size()))));
  for (std::int64_t j = 0; j < n; ++j)
    if (!out_of[static_cast<std::size_t>(j)]) rest.push_back(j);
  return rest;
}

std::vector<std::int64_t> merge_sorted(std::span<const std::int64_t> a, std::span<const std::int64_t> b) {
  std::vector<std::int64_t> out;
  out.reserve(a.size() + b.size());
  // One list wholly after the other (a window after the kept, sinks before
  // them: the usual case) is a concatenation, copied in bulk.
  if (a.empty() || b.empty() || a.back() < b.front() || b.back() < a.front()) {
    const bool a_first = b.empty() || (!a.empty() && a.back() < b.front());
    const auto first = a_first ? a : b, second = a_first ? b : a;
    out.insert(out.end(), first.begin(), first.end());
    out.insert(out.end(), second.begin(), second.end());
    return out;
  }
  std::set_union(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(out));
  return out;
}

}  // namespace kvscope::ref
