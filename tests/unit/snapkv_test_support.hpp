// Helpers shared by the SnapKV, PyramidKV and AdaKV tests: layers with
// integer-valued entries (exact ties are common), method construction, error
// kinds, and the kept-set optimality oracle.
#pragma once

#include <rapidcheck.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scorer.hpp"
#include "kvscope_layer.hpp"

namespace kvscope::tests::snap {

inline std::unique_ptr<ref::Method> make(const std::string& spec) { return ref::make_method(MethodSpec::parse(spec)); }

inline ErrorKind kind_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.kind();
  }
  return ErrorKind::kInternal;
}

/// A layer whose entries are multiples of 1/2 in [-1.5, 1.5] (grid) or of 1/1000 (fine), from RapidCheck.
inline LayerFixture gen_layer(int q_heads, int kv_heads, std::int64_t tokens, int head_dim, bool grid) {
  LayerFixture f;
  f.meta->layers = 1;
  f.meta->q_heads = q_heads;
  f.meta->kv_heads = kv_heads;
  f.meta->head_dim = head_dim;
  f.meta->prompt_len = tokens;
  f.input.meta = f.meta.get();
  auto fill = [&] {
    ref::MatX m(tokens, head_dim);
    for (Eigen::Index i = 0; i < m.size(); ++i)
      m.data()[i] = grid ? *rc::gen::inRange(-3, 4) * 0.5 : *rc::gen::inRange(-2000, 2001) / 1000.0;
    return m;
  };
  for (int h = 0; h < q_heads; ++h) f.input.q.push_back(fill());
  for (int h = 0; h < kv_heads; ++h) {
    f.input.k.push_back(fill());
    f.input.v.push_back(fill());
  }
  return f;
}

struct Optimality {
  bool ok = true;              // min kept score >= max evicted score over the candidates
  double margin = std::numeric_limits<double>::infinity();
  std::int64_t ties = 0;       // evicted candidates scoring exactly the smallest kept score
};

/// Checks a kept set (ascending original indices) against per-token scores;
/// protected tokens are not candidates.
inline Optimality optimality(const std::vector<std::int64_t>& kept, const ref::VecX& scores,
                             const std::vector<std::int64_t>& prot) {
  std::vector<char> is_kept(static_cast<std::size_t>(scores.size()), 0), is_prot(is_kept);
  for (auto j : kept) is_kept[static_cast<std::size_t>(j)] = 1;
  for (auto j : prot) is_prot[static_cast<std::size_t>(j)] = 1;
  double min_kept = std::numeric_limits<double>::infinity(), max_ev = -std::numeric_limits<double>::infinity();
  for (Eigen::Index j = 0; j < scores.size(); ++j) {
    if (is_prot[static_cast<std::size_t>(j)]) continue;
    if (is_kept[static_cast<std::size_t>(j)]) min_kept = std::min(min_kept, scores[j]);
    else max_ev = std::max(max_ev, scores[j]);
  }
  Optimality o;
  o.ok = min_kept >= max_ev;
  if (std::isfinite(min_kept) && std::isfinite(max_ev)) o.margin = min_kept - max_ev;
  for (Eigen::Index j = 0; j < scores.size(); ++j)
    if (!is_prot[static_cast<std::size_t>(j)] && !is_kept[static_cast<std::size_t>(j)] && scores[j] == min_kept) ++o.ties;
  return o;
}

inline bool contains_all(const std::vector<std::int64_t>& kept, const std::vector<std::int64_t>& prot) {
  return std::includes(kept.begin(), kept.end(), prot.begin(), prot.end());
}

}  // namespace kvscope::tests::snap
