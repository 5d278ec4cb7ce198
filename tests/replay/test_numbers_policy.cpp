// The numbers policy (docs/robustness.md) on the replay side: layers that did
// not come through the reader get the reader's shape and NaN/Inf rules with
// the same located message; every finite value, however large, replays to
// finite metrics (the reference computes in double).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>

#include "kvscope/core/error.hpp"
#include "kvscope/replay/replay.hpp"

namespace kvscope::replay {
namespace {

TraceMeta small_meta() {
  TraceMeta m;
  m.layers = 2;
  m.q_heads = 4;
  m.kv_heads = 2;
  m.head_dim = 4;
  m.prompt_len = 12;
  m.decode_steps = 3;
  m.has_attn_colsum = true;
  return m;
}

LayerData random_layer(const TraceMeta& m, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  auto make = [&](std::vector<std::int64_t> shape, bool positive = false) {
    Tensor t(std::move(shape));
    for (float& x : t.data) x = scale * (positive ? std::abs(u(rng)) : u(rng));
    return t;
  };
  const std::int64_t q = m.q_heads, kv = m.kv_heads, d = m.head_dim, T = m.prompt_len, S = m.decode_steps;
  LayerData l{make({q, T, d}), make({kv, T, d}), make({kv, T, d}), make({q, S, d}), make({kv, S, d}), make({kv, S, d}),
              {}, make({q, T}, true)};
  return l;
}

ReplayOptions options() {
  ReplayOptions o;
  o.methods = MethodSpec::parse_list("full,streaming_llm:sinks=1:recent=4");
  o.budgets = {Budget::tokens(6)};
  return o;
}

// Runs replay over two layers, the second changed by `poison`; returns the error.
Error replay_error(const std::function<void(LayerData&)>& poison) {
  const TraceMeta m = small_meta();
  try {
    run_replay(m, [&](int l) {
      LayerData d = random_layer(m, 7u + static_cast<std::uint32_t>(l));
      if (l == 1) poison(d);
      return d;
    }, options());
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "replay accepted a poisoned layer";
  return Error(ErrorKind::kInternal, "");
}

TEST(NumbersPolicy, NaNInALayerSourceIsABadNumberWithItsLocation) {
  const Error e = replay_error([](LayerData& d) { d.decode_k.row(1, 2)[3] = std::numeric_limits<float>::quiet_NaN(); });
  EXPECT_EQ(e.kind(), ErrorKind::kBadNumber);
  EXPECT_STREQ(e.what(), "layer 1: decode/k has NaN at head 1, token 2, dim 3");
}

TEST(NumbersPolicy, InfInPrefillValuesIsABadNumber) {
  const Error e = replay_error([](LayerData& d) { d.prefill_v.row(0, 5)[0] = -std::numeric_limits<float>::infinity(); });
  EXPECT_EQ(e.kind(), ErrorKind::kBadNumber);
  EXPECT_STREQ(e.what(), "layer 1: prefill/v has -Inf at head 0, token 5, dim 0");
}

TEST(NumbersPolicy, NegativeAccumulatedAttentionIsABadNumber) {
  const Error e = replay_error([](LayerData& d) { d.attn_colsum->data[3] = -0.5f; });
  EXPECT_EQ(e.kind(), ErrorKind::kBadNumber);
  EXPECT_NE(std::string(e.what()).find("prefill/attn_colsum has negative value -0.5 at head 0, token 3"), std::string::npos)
      << e.what();
}

TEST(NumbersPolicy, AMisshapenLayerIsRejectedBeforeItIsRead) {
  const Error e = replay_error([](LayerData& d) { d.decode_q = Tensor({4, 2, 4}); });
  EXPECT_EQ(e.kind(), ErrorKind::kTraceInvalid);
  EXPECT_STREQ(e.what(), "layer 1: decode/q has shape [4, 2, 4], expected [4, 3, 4]");
}

TEST(NumbersPolicy, AnUndeclaredOptionalDatasetIsRejected) {
  const Error e = replay_error([](LayerData& d) { d.decode_o = Tensor({4, 3, 4}); });
  EXPECT_EQ(e.kind(), ErrorKind::kTraceInvalid);
  EXPECT_NE(std::string(e.what()).find("decode/o is given but has_decode_outputs = 0"), std::string::npos) << e.what();
}

// The largest finite float32 in q, k and v: logits reach d * (3.4e38)^2 ~ 5e77,
// far inside double range, so every metric stays finite and the bound holds.
TEST(NumbersPolicy, HugeFiniteValuesReplayToFiniteMetrics) {
  const TraceMeta m = small_meta();
  const float big = std::numeric_limits<float>::max();
  for (const float scale : {1e19f, big}) {
    const ReplayResult r = run_replay(m, [&](int l) {
      LayerData d = random_layer(m, 11u + static_cast<std::uint32_t>(l), scale);
      d.prefill_k.row(0, 0)[0] = big;  // one extreme key and query per layer
      d.decode_q.row(0, 0)[0] = -big;
      for (float& x : d.attn_colsum->data) x = std::min(x, 1e30f);
      return d;
    }, options());
    ASSERT_EQ(r.runs.size(), 2u);
    for (const RunSummary& run : r.runs) {
      EXPECT_GT(run.all.count, 0);
      EXPECT_TRUE(std::isfinite(run.all.sum_rel_l2)) << run.method << " scale " << scale;
      EXPECT_TRUE(std::isfinite(run.all.sum_cosine)) << run.method << " scale " << scale;
      EXPECT_TRUE(std::isfinite(run.all.sum_mass_lost)) << run.method << " scale " << scale;
      EXPECT_LE(run.all.max_bound_ratio, 1.0 + 1e-6) << run.method << " scale " << scale;
    }
    EXPECT_EQ(r.runs[0].all.max_rel_l2, 0.0);  // full: exact whatever the magnitude
  }
}

TEST(NumbersPolicy, SubnormalsAndZerosReplay) {
  const TraceMeta m = small_meta();
  const ReplayResult r = run_replay(m, [&](int l) {
    LayerData d = random_layer(m, 3u + static_cast<std::uint32_t>(l), 1e-39f);  // subnormal float32
    for (float& x : d.decode_v.data) x = 0.0f;  // zero outputs: rel-L2 falls back to absolute
    return d;
  }, options());
  for (const RunSummary& run : r.runs) {
    EXPECT_TRUE(std::isfinite(run.all.sum_rel_l2)) << run.method;
    EXPECT_TRUE(std::isfinite(run.all.sum_cosine)) << run.method;
  }
}

}  // namespace
}  // namespace kvscope::replay
