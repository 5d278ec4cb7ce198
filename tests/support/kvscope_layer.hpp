// A random prefill layer for method tests (fixed seed, standard normal entries).
#pragma once

#include <memory>
#include <random>

#include "kvscope/reference/method.hpp"

namespace kvscope::tests {

struct LayerFixture {
  std::shared_ptr<TraceMeta> meta = std::make_shared<TraceMeta>();  // stable address: input.meta points here
  ref::LayerInput input;
};

inline LayerFixture random_layer(int q_heads, int kv_heads, std::int64_t tokens, int head_dim, std::uint64_t seed) {
  LayerFixture f;
  f.meta->layers = 1;
  f.meta->q_heads = q_heads;
  f.meta->kv_heads = kv_heads;
  f.meta->head_dim = head_dim;
  f.meta->prompt_len = tokens;
  f.input.meta = f.meta.get();
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g;
  auto fill = [&](std::int64_t rows) {
    ref::MatX m(rows, head_dim);
    for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = g(rng);
    return m;
  };
  for (int h = 0; h < q_heads; ++h) f.input.q.push_back(fill(tokens));
  for (int h = 0; h < kv_heads; ++h) {
    f.input.k.push_back(fill(tokens));
    f.input.v.push_back(fill(tokens));
  }
  return f;
}

}  // namespace kvscope::tests
