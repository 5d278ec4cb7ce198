// Writes the reader's seed corpus with the real writer: small valid traces in
// every dtype, with and without filters and optional datasets. Valid files are
// the best seeds: mutations of them reach deep into the validator.
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kvscope/traces/trace_io.hpp"

using namespace kvscope;

namespace {

LayerData layer(const TraceMeta& m, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  auto make = [&](std::vector<std::int64_t> shape, bool positive) {
    Tensor t(std::move(shape));
    for (float& x : t.data) x = positive ? std::abs(dist(rng)) : dist(rng);
    return t;
  };
  const std::int64_t q = m.q_heads, kv = m.kv_heads, d = m.head_dim, T = m.prompt_len, S = m.decode_steps;
  LayerData l{make({q, T, d}, false), make({kv, T, d}, false), make({kv, T, d}, false),
              make({q, S, d}, false), make({kv, S, d}, false), make({kv, S, d}, false), {}, {}};
  if (m.has_decode_outputs) l.decode_o = make({q, S, d}, false);
  if (m.has_attn_colsum) l.attn_colsum = make({q, T}, true);
  return l;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_make_seeds OUT_DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  struct Case {
    const char* name;
    DType dtype;
    int layers, q, kv, d;
    std::int64_t T, S;
    bool o, colsum, deflate, fletcher;
  };
  const Case cases[] = {
      {"f16_full", DType::kF16, 2, 4, 2, 8, 6, 3, true, true, false, true},
      {"bf16_plain", DType::kBF16, 1, 2, 1, 4, 5, 2, false, false, false, false},
      {"f32_deflate", DType::kF32, 1, 2, 2, 4, 7, 1, true, false, true, true},
      {"f16_no_decode", DType::kF16, 1, 1, 1, 2, 3, 0, false, true, false, true},
      {"f16_chunked", DType::kF16, 1, 2, 1, 16, 40, 4, false, false, true, true},
  };
  for (const Case& c : cases) {
    TraceMeta m;
    m.model = c.name;
    m.layers = c.layers;
    m.q_heads = c.q;
    m.kv_heads = c.kv;
    m.head_dim = c.d;
    m.prompt_len = c.T;
    m.decode_steps = c.S;
    m.dtype = c.dtype;
    m.has_decode_outputs = c.o;
    m.has_attn_colsum = c.colsum;
    std::vector<LayerData> layers;
    for (int l = 0; l < c.layers; ++l) layers.push_back(layer(m, static_cast<std::uint32_t>(l + 1)));
    traces::WriteOptions w;
    w.deflate = c.deflate;
    w.fletcher32 = c.fletcher;
    w.chunk_bytes = 64;  // several chunks per dataset: exercises the chunk index
    traces::write_trace(dir + "/" + c.name + ".h5", m, layers, w);
  }
  return 0;
}
