// Synthetic trace generator (docs/synthetic-traces.md): shapes, determinism,
// dtype, the derived data (decode/o, attn_colsum) against the reference, and the
// planted structure. Every structure threshold is checked to fail on a config
// with that structure switched off (the *Control tests). Seeds are fixed.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/attention.hpp"
#include "kvscope/traces/synth.hpp"

using namespace kvscope;
using traces::SynthConfig;

namespace {

ref::VecX row_vec(const Tensor& t, std::int64_t h, std::int64_t i) {
  const auto r = t.row(h, i);
  ref::VecX v(static_cast<Eigen::Index>(r.size()));
  for (std::size_t j = 0; j < r.size(); ++j) v[static_cast<Eigen::Index>(j)] = r[j];
  return v;
}

// Keys (or values) of kv head h, prompt then decode rows.
ref::MatX all_rows(const Tensor& pre, const Tensor& dec, std::int64_t h) {
  const std::int64_t T = pre.dim(1), S = dec.dim(1), d = pre.dim(2);
  ref::MatX m(T + S, d);
  for (std::int64_t t = 0; t < T; ++t) m.row(t) = row_vec(pre, h, t).transpose();
  for (std::int64_t t = 0; t < S; ++t) m.row(T + t) = row_vec(dec, h, t).transpose();
  return m;
}

double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x.empty() ? 0.0 : x[x.size() / 2];
}

double mean(const std::vector<double>& x) { return std::accumulate(x.begin(), x.end(), 0.0) / static_cast<double>(x.size()); }

bool same_bits(const Tensor& a, const Tensor& b) {
  // memcmp must not see the null data() of an empty tensor (UBSan), even with size 0.
  return a.shape == b.shape && a.data.size() == b.data.size() &&
         (a.data.empty() || std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(float)) == 0);
}

bool same_layer(const LayerData& a, const LayerData& b) {
  return same_bits(a.prefill_q, b.prefill_q) && same_bits(a.prefill_k, b.prefill_k) && same_bits(a.prefill_v, b.prefill_v) &&
         same_bits(a.decode_q, b.decode_q) && same_bits(a.decode_k, b.decode_k) && same_bits(a.decode_v, b.decode_v) &&
         a.decode_o.has_value() == b.decode_o.has_value() && (!a.decode_o || same_bits(*a.decode_o, *b.decode_o)) &&
         a.attn_colsum.has_value() == b.attn_colsum.has_value() && (!a.attn_colsum || same_bits(*a.attn_colsum, *b.attn_colsum));
}

std::uint64_t fnv1a(const LayerData& l) {
  std::uint64_t h = 1469598103934665603ULL;
  auto eat = [&h](const Tensor& t) {
    for (float f : t.data) {
      std::uint32_t b;
      std::memcpy(&b, &f, 4);
      for (int i = 0; i < 4; ++i) h = (h ^ ((b >> (8 * i)) & 0xffU)) * 1099511628211ULL;
    }
  };
  for (const Tensor* t : {&l.prefill_q, &l.prefill_k, &l.prefill_v, &l.decode_q, &l.decode_k, &l.decode_v}) eat(*t);
  return h;  // decode/o and colsum are left out: Eigen's reductions may differ across SIMD builds
}

// ---- structure statistics (one layer) ----

struct KeyStats {
  double mean_cos;    // mean cosine of consecutive prompt keys
  double low_share;   // share of consecutive pairs with cosine <= 0.75 (KVMerger's epsilon)
};
KeyStats adjacent_keys(const LayerData& l, std::int64_t h) {
  const ref::MatX K = all_rows(l.prefill_k, l.decode_k, h);
  std::vector<double> c;
  for (Eigen::Index t = 0; t + 1 < l.prefill_k.dim(1); ++t)
    c.push_back(K.row(t).dot(K.row(t + 1)) / (K.row(t).norm() * K.row(t + 1).norm()));
  const auto low = std::count_if(c.begin(), c.end(), [](double x) { return x <= 0.75; });
  return {mean(c), static_cast<double>(low) / static_cast<double>(c.size())};
}

// Attention of prefill query p (or decode step p - T) of q head qh over keys 0..p.
ref::VecX probs_at(const LayerData& l, int q_heads, int kv_heads, int qh, std::int64_t p) {
  const std::int64_t T = l.prefill_q.dim(1);
  const int h = ref::kv_head_of(qh, q_heads, kv_heads);
  const ref::MatX K = all_rows(l.prefill_k, l.decode_k, h), V = all_rows(l.prefill_v, l.decode_v, h);
  const ref::VecX q = p < T ? row_vec(l.prefill_q, qh, p) : row_vec(l.decode_q, qh, p - T);
  return ref::attend(q, K.topRows(p + 1), V.topRows(p + 1)).probs;
}

// Mean share of attention on the sinks, over prefill queries in the second half
// of the prompt (early queries see few keys, which would inflate the share).
double sink_share(const LayerData& l, const SynthConfig& c, int qh) {
  std::vector<double> share;
  for (std::int64_t p = c.prompt / 2; p < c.prompt; ++p) share.push_back(probs_at(l, c.q_heads, c.kv_heads, qh, p).head(c.sinks).sum());
  return mean(share);
}

// Median attention per query received by heavy hitters over that of plain
// tokens, from the recorded colsum (divided by the number of queries that see each key).
double heavy_ratio(const LayerData& l, const SynthConfig& c, const traces::SynthPlanted& planted, int qh) {
  std::vector<double> heavy, plain;
  for (std::int64_t t = c.sinks; t < c.prompt - 1; ++t) {
    const double received = l.attn_colsum->at(qh, t) / static_cast<double>(c.prompt - t);
    if (std::binary_search(planted.heavy.begin(), planted.heavy.end(), t)) heavy.push_back(received);
    else if (t != planted.needle) plain.push_back(received);
  }
  return median(heavy) / median(plain);
}

SynthConfig demo() { return SynthConfig{}; }  // the demo sample: 4 layers, 8/2 heads, d 64, T 512, S 32, fp16

}  // namespace

// ---- shapes and meta ----

TEST(Synth, ShapesAndMetaAcrossGqaGroups) {
  for (int kv : {8, 4, 2, 1}) {  // groups 1, 2, 4, 8
    for (const auto& [d, T, S, dtype] : {std::tuple{64, 40, 5, DType::kF16}, std::tuple{2, 7, 0, DType::kBF16},
                                         std::tuple{16, 1, 3, DType::kF32}}) {
      SynthConfig c;
      c.layers = 2;
      c.q_heads = 8;
      c.kv_heads = kv;
      c.head_dim = d;
      c.prompt = T;
      c.decode = S;
      c.dtype = dtype;
      SCOPED_TRACE("kv " + std::to_string(kv) + " d " + std::to_string(d) + " T " + std::to_string(T));
      const TraceMeta m = traces::synth_meta(c);
      EXPECT_EQ(m.layers, 2);
      EXPECT_EQ(m.q_heads, 8);
      EXPECT_EQ(m.kv_heads, kv);
      EXPECT_EQ(m.group_size(), 8 / kv);
      EXPECT_EQ(m.head_dim, d);
      EXPECT_EQ(m.prompt_len, T);
      EXPECT_EQ(m.decode_steps, S);
      EXPECT_EQ(m.dtype, dtype);
      EXPECT_EQ(m.rope_theta, c.rope_theta);
      EXPECT_EQ(m.rope_style, "neox");
      EXPECT_TRUE(m.keys_post_rope);
      EXPECT_TRUE(m.has_decode_outputs);
      EXPECT_TRUE(m.has_attn_colsum);
      const LayerData l = traces::synth_layer(c, 1);
      using S64 = std::vector<std::int64_t>;
      EXPECT_EQ(l.prefill_q.shape, (S64{8, T, d}));
      EXPECT_EQ(l.prefill_k.shape, (S64{kv, T, d}));
      EXPECT_EQ(l.prefill_v.shape, (S64{kv, T, d}));
      EXPECT_EQ(l.decode_q.shape, (S64{8, S, d}));
      EXPECT_EQ(l.decode_k.shape, (S64{kv, S, d}));
      EXPECT_EQ(l.decode_v.shape, (S64{kv, S, d}));
      ASSERT_TRUE(l.decode_o && l.attn_colsum);
      EXPECT_EQ(l.decode_o->shape, (S64{8, S, d}));
      EXPECT_EQ(l.attn_colsum->shape, (S64{8, T}));
    }
  }
}

TEST(Synth, RecordFlagsOmitDerivedData) {
  SynthConfig c;
  c.prompt = 32;
  c.decode = 4;
  c.record_outputs = false;
  c.record_colsum = false;
  const TraceMeta m = traces::synth_meta(c);
  EXPECT_FALSE(m.has_decode_outputs);
  EXPECT_FALSE(m.has_attn_colsum);
  const LayerData l = traces::synth_layer(c, 0);
  EXPECT_FALSE(l.decode_o.has_value());
  EXPECT_FALSE(l.attn_colsum.has_value());
}

TEST(Synth, PlantedStructureIsWhereTheConfigSays) {
  SynthConfig c = demo();
  c.sinks = 3;
  c.retrieval_heads = 2;
  const auto p = traces::synth_planted(c, 2);
  EXPECT_EQ(p.sinks, (std::vector<std::int64_t>{0, 1, 2}));
  EXPECT_EQ(p.needle, 256);  // floor(0.5 * 512)
  ASSERT_EQ(p.retrieval_heads.size(), 2u);
  EXPECT_TRUE(std::is_sorted(p.retrieval_heads.begin(), p.retrieval_heads.end()));
  EXPECT_LT(p.retrieval_heads[0], p.retrieval_heads[1]);
  EXPECT_LT(p.retrieval_heads[1], c.q_heads);
  // Heavy hitters: about heavy_fraction of the tokens, never a sink or the needle, shared by layers.
  EXPECT_GT(p.heavy.size(), 3u);
  EXPECT_LT(p.heavy.size(), 30u);  // expected 0.02 * 544 ~ 11
  for (auto t : p.heavy) EXPECT_TRUE(t >= 3 && t != p.needle && t < c.prompt + c.decode);
  EXPECT_EQ(traces::synth_planted(c, 0).heavy, p.heavy);
  c.needle = false;
  EXPECT_EQ(traces::synth_planted(c, 2).needle, -1);
  EXPECT_TRUE(traces::synth_planted(c, 2).retrieval_heads.empty());
}

// ---- determinism ----

TEST(Synth, SameConfigGivesTheSameBits) {
  const SynthConfig c = demo();
  EXPECT_TRUE(same_layer(traces::synth_layer(c, 2), traces::synth_layer(c, 2)));
}

TEST(Synth, LayerDependsOnlyOnConfigAndLayer) {
  SynthConfig c = demo();
  c.prompt = 64;
  c.decode = 4;
  const LayerData forward = traces::synth_layer(c, 3);
  for (int l : {2, 0, 1}) (void)traces::synth_layer(c, l);  // no hidden state between calls
  EXPECT_TRUE(same_layer(forward, traces::synth_layer(c, 3)));
  EXPECT_FALSE(same_layer(traces::synth_layer(c, 2), forward));  // layers differ
}

TEST(Synth, SeedChangesTheData) {
  SynthConfig a = demo(), b = demo();
  a.prompt = b.prompt = 64;
  b.seed = 2;
  const LayerData la = traces::synth_layer(a, 1), lb = traces::synth_layer(b, 1);
  EXPECT_FALSE(same_bits(la.prefill_k, lb.prefill_k));
  EXPECT_FALSE(same_bits(la.prefill_q, lb.prefill_q));
  EXPECT_FALSE(same_bits(la.prefill_v, lb.prefill_v));
}

// A change detector for platform independence: mt19937_64 and the polar method
// are fully specified, so these bits must not change across compilers and
// platforms. Update the constant only when the model is changed on purpose.
TEST(Synth, GoldenChecksum) {
  SynthConfig c;
  c.layers = 2;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.head_dim = 16;
  c.prompt = 48;
  c.decode = 4;
  c.seed = 7;
  const std::uint64_t h = fnv1a(traces::synth_layer(c, 1));
  RecordProperty("checksum", std::to_string(h));
  EXPECT_EQ(h, 16025657525867360882ULL) << "checksum " << h;
}

// The file holds exactly what synth_layer returns (values were rounded before writing).
TEST(Synth, FileRoundTripsBitExactly) {
  SynthConfig c = demo();
  c.layers = 2;
  c.prompt = 40;
  c.decode = 3;
  c.dtype = DType::kBF16;
  const std::string path = ::testing::TempDir() + "kvscope_synth_roundtrip.h5";
  traces::synth_to_file(c, path);
  const traces::TraceReader reader(path);
  EXPECT_EQ(reader.meta().layers, 2);
  EXPECT_EQ(reader.meta().dtype, DType::kBF16);
  EXPECT_TRUE(reader.meta().has_decode_outputs && reader.meta().has_attn_colsum);
  for (int l = 0; l < c.layers; ++l) EXPECT_TRUE(same_layer(reader.read_layer(l), traces::synth_layer(c, l))) << "layer " << l;
  std::remove(path.c_str());
}

// ---- dtype ----

TEST(Synth, ValuesAreRepresentableInTheDtype) {
  for (DType dt : {DType::kF16, DType::kBF16}) {
    SynthConfig c = demo();
    c.prompt = 128;
    c.decode = 8;
    c.dtype = dt;
    const LayerData l = traces::synth_layer(c, 1);
    for (const Tensor* t : {&l.prefill_q, &l.prefill_k, &l.prefill_v, &l.decode_q, &l.decode_k, &l.decode_v, &*l.decode_o}) {
      double norm = 0;
      for (float x : t->data) {
        ASSERT_TRUE(std::isfinite(x));
        ASSERT_EQ(round_to_dtype(x, dt), x) << dtype_name(dt);
        norm += double(x) * x;
      }
      EXPECT_GT(norm, 0.0);
    }
  }
}

// ---- derived data against the reference ----

TEST(Synth, DecodeOutputsAreFullCacheAttention) {
  for (DType dt : {DType::kF16, DType::kBF16, DType::kF32}) {
    SynthConfig c = demo();
    c.prompt = 96;
    c.decode = 6;
    c.dtype = dt;
    // Half an ulp of the dtype (plus slack for double -> float -> dtype), and its smallest subnormal.
    const double rel = (dt == DType::kF16 ? 0x1p-11 : dt == DType::kBF16 ? 0x1p-8 : 0x1p-24) * 1.01;
    const double abs = dt == DType::kF16 ? 0x1p-25 : 1e-40;
    const LayerData l = traces::synth_layer(c, 1);
    double max_prompt_only_diff = 0;
    for (int qh = 0; qh < c.q_heads; ++qh) {
      const int h = ref::kv_head_of(qh, c.q_heads, c.kv_heads);
      const ref::MatX K = all_rows(l.prefill_k, l.decode_k, h), V = all_rows(l.prefill_v, l.decode_v, h);
      for (std::int64_t s = 0; s < c.decode; ++s) {
        const ref::VecX q = row_vec(l.decode_q, qh, s);
        const ref::VecX want = ref::attend(q, K.topRows(c.prompt + s + 1), V.topRows(c.prompt + s + 1)).output;
        const ref::VecX got = row_vec(*l.decode_o, qh, s);
        for (Eigen::Index i = 0; i < want.size(); ++i)
          ASSERT_LE(std::abs(got[i] - want[i]), rel * std::abs(want[i]) + abs) << dtype_name(dt) << " head " << qh << " step " << s;
        // The check can tell the full cache from the prompt alone.
        const ref::VecX prompt_only = ref::attend(q, K.topRows(c.prompt), V.topRows(c.prompt)).output;
        max_prompt_only_diff = std::max(max_prompt_only_diff, (prompt_only - want).cwiseAbs().maxCoeff());
      }
    }
    EXPECT_GT(max_prompt_only_diff, 1e-2);
  }
}

TEST(Synth, ColsumIsCausalAttentionAndSumsToT) {
  SynthConfig c = demo();
  c.prompt = 128;
  c.decode = 2;
  const LayerData l = traces::synth_layer(c, 2);
  for (int qh = 0; qh < c.q_heads; ++qh) {
    const int h = ref::kv_head_of(qh, c.q_heads, c.kv_heads);
    ref::MatX Q(c.prompt, c.head_dim), K(c.prompt, c.head_dim);
    for (std::int64_t t = 0; t < c.prompt; ++t) {
      Q.row(t) = row_vec(l.prefill_q, qh, t).transpose();
      K.row(t) = row_vec(l.prefill_k, h, t).transpose();
    }
    const ref::VecX want = ref::causal_attention_colsum(Q, K);
    double sum = 0;
    for (std::int64_t t = 0; t < c.prompt; ++t) {
      const double got = l.attn_colsum->at(qh, t);
      ASSERT_GE(got, 0.0);
      ASSERT_LE(got, static_cast<double>(c.prompt - t) * (1 + 1e-6));  // at most one unit per query that sees it
      ASSERT_NEAR(got, want[t], 1e-6 * (1 + want[t]));               // float32, not rounded to fp16
      sum += got;
    }
    EXPECT_NEAR(sum, static_cast<double>(c.prompt), 1e-4 * static_cast<double>(c.prompt)) << "head " << qh;
  }
}

// ---- structure on the demo config ----
// Thresholds come with margin from the measured values (printed; see the
// report in docs/synthetic-traces.md) and each is shown to fail with the
// structure switched off in the matching *Control test.

namespace {

struct DemoStats {
  std::vector<double> adjacent_cos, low_share;  // per (layer >= 1, kv head)
  std::vector<double> sink, heavy;              // per (layer >= 1, q head)
  std::vector<double> needle_prob, needle_other;  // retrieval heads, late decode / other heads
  std::vector<bool> needle_argmax;
};

DemoStats measure(const SynthConfig& c) {
  DemoStats s;
  for (int layer = 1; layer < c.layers; ++layer) {  // layer 0 attends broadly by design
    const LayerData l = traces::synth_layer(c, layer);
    const auto planted = traces::synth_planted(c, layer);
    for (int h = 0; h < c.kv_heads; ++h) {
      const KeyStats k = adjacent_keys(l, h);
      s.adjacent_cos.push_back(k.mean_cos);
      s.low_share.push_back(k.low_share);
    }
    for (int qh = 0; qh < c.q_heads; ++qh) {
      if (c.sinks > 0) s.sink.push_back(sink_share(l, c, qh));
      if (!planted.heavy.empty() && l.attn_colsum) s.heavy.push_back(heavy_ratio(l, c, planted, qh));
      if (planted.needle < 0) continue;
      const bool retrieval = std::binary_search(planted.retrieval_heads.begin(), planted.retrieval_heads.end(), qh);
      for (std::int64_t st = c.decode - c.decode / 4; st < c.decode; ++st) {  // the last quarter of decode
        const ref::VecX p = probs_at(l, c.q_heads, c.kv_heads, qh, c.prompt + st);
        Eigen::Index arg;
        p.maxCoeff(&arg);
        (retrieval ? s.needle_prob : s.needle_other).push_back(p[planted.needle]);
        if (retrieval) s.needle_argmax.push_back(arg == planted.needle);
      }
    }
  }
  return s;
}

void print_stats(const char* label, const DemoStats& s) {
  auto lo = [](const std::vector<double>& x) { return *std::min_element(x.begin(), x.end()); };
  std::printf("%s: adjacent key cosine mean %.3f (lowest head %.3f), pairs <= 0.75: %.3f\n", label, mean(s.adjacent_cos),
              lo(s.adjacent_cos), mean(s.low_share));
  std::printf("%s: sink share median %.3f (lowest head %.3f); heavy/plain ratio median %.1f (lowest %.1f)\n", label,
              median(s.sink), lo(s.sink), median(s.heavy), lo(s.heavy));
  std::printf("%s: needle prob in retrieval heads, late decode: mean %.3f (lowest %.3f); other heads max %.4f\n", label,
              mean(s.needle_prob), lo(s.needle_prob), *std::max_element(s.needle_other.begin(), s.needle_other.end()));
}

double fraction_above(const std::vector<double>& x, double threshold) {
  return static_cast<double>(std::count_if(x.begin(), x.end(), [&](double v) { return v > threshold; })) /
         static_cast<double>(x.size());
}

}  // namespace

TEST(SynthStructure, DemoConfig) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int l = 0; l < demo().layers; ++l) (void)traces::synth_layer(demo(), l);
  const double gen_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const DemoStats s = measure(demo());
  std::printf("demo: generation %.3f s\n", gen_s);
  print_stats("demo", s);
  RecordProperty("generation_seconds", std::to_string(gen_s));

  // KVMerger: adjacent keys are very similar in most heads, with breaks so merge sets are runs.
  EXPECT_GE(fraction_above(s.adjacent_cos, 0.8), 0.75);
  EXPECT_GT(mean(s.low_share), 0.01);
  EXPECT_LT(mean(s.low_share), 0.25);
  // Sinks: most q heads give the first token a large share of attention.
  EXPECT_GE(fraction_above(s.sink, 0.3), 0.75);
  // Heavy hitters get far more attention per query than the median token.
  EXPECT_GE(fraction_above(s.heavy, 5.0), 0.75);
  // The needle is retrieved by the retrieval heads late in decode, and by no one else.
  EXPECT_TRUE(std::all_of(s.needle_argmax.begin(), s.needle_argmax.end(), [](bool b) { return b; }));
  EXPECT_GT(*std::min_element(s.needle_prob.begin(), s.needle_prob.end()), 0.5);
  EXPECT_LT(*std::max_element(s.needle_other.begin(), s.needle_other.end()), 0.05);
}

// The same assertions with the structure switched off must fail.
TEST(SynthStructure, Control) {
  SynthConfig c = demo();
  c.key_rho = 0;
  c.segment_break = 0;
  c.sink_logit = 0;
  c.heavy_logit = 0;
  c.needle_logit = 0;
  c.layers = 2;
  const DemoStats s = measure(c);
  print_stats("control", s);
  EXPECT_LT(fraction_above(s.adjacent_cos, 0.8), 0.75);
  EXPECT_LT(fraction_above(s.sink, 0.3), 0.75);
  EXPECT_LT(fraction_above(s.heavy, 5.0), 0.75);
  EXPECT_LT(*std::min_element(s.needle_prob.begin(), s.needle_prob.end()), 0.5);
  // Breaks alone: a latent that restarts every token leaves adjacent keys with little in common.
  c = demo();
  c.layers = 2;
  c.segment_break = 1;
  const DemoStats b = measure(c);
  std::printf("segment_break 1: adjacent key cosine mean %.3f\n", mean(b.adjacent_cos));
  EXPECT_LT(fraction_above(b.adjacent_cos, 0.8), 0.75);
}

// Early layers attend broadly (PyramidKV, KVMerger): layer 0's sinks get less than the last layer's.
TEST(SynthStructure, EarlyLayersAreBroader) {
  SynthConfig c = demo();
  c.prompt = 256;
  const LayerData first = traces::synth_layer(c, 0), last = traces::synth_layer(c, c.layers - 1);
  std::vector<double> a, b;
  for (int qh = 0; qh < c.q_heads; ++qh) {
    a.push_back(sink_share(first, c, qh));
    b.push_back(sink_share(last, c, qh));
  }
  std::printf("sink share layer 0 %.3f, layer %d %.3f\n", mean(a), c.layers - 1, mean(b));
  EXPECT_LT(mean(a), 0.5 * mean(b));
  c.early_layer_focus = 1;
  const LayerData flat = traces::synth_layer(c, 0);
  a.clear();
  for (int qh = 0; qh < c.q_heads; ++qh) a.push_back(sink_share(flat, c, qh));
  EXPECT_GT(mean(a), 0.5 * mean(b));  // control
}

// GQA: the q heads of a group share their kv head's latent, so their attention
// to plain tokens agrees far more within a group than across groups.
TEST(SynthStructure, GroupsShareStructure) {
  SynthConfig c = demo();
  c.prompt = 256;
  c.kv_heads = 2;
  const LayerData l = traces::synth_layer(c, 1);
  const auto planted = traces::synth_planted(c, 1);
  auto profile = [&](int qh) {  // log attention received per query, plain tokens only
    std::vector<double> x;
    for (std::int64_t t = c.sinks; t < c.prompt - 1; ++t)
      if (!std::binary_search(planted.heavy.begin(), planted.heavy.end(), t) && t != planted.needle)
        x.push_back(std::log(l.attn_colsum->at(qh, t) / static_cast<double>(c.prompt - t)));
    return x;
  };
  auto corr = [](const std::vector<double>& x, const std::vector<double>& y) {
    const double mx = mean(x), my = mean(y);
    double sxy = 0, sxx = 0, syy = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      sxy += (x[i] - mx) * (y[i] - my);
      sxx += (x[i] - mx) * (x[i] - mx);
      syy += (y[i] - my) * (y[i] - my);
    }
    return sxy / std::sqrt(sxx * syy);
  };
  std::vector<double> within, across;
  const int g = c.q_heads / c.kv_heads;
  for (int a = 0; a < c.q_heads; ++a)
    for (int b = a + 1; b < c.q_heads; ++b) (a / g == b / g ? within : across).push_back(corr(profile(a), profile(b)));
  std::printf("colsum profile correlation: within groups %.3f, across %.3f\n", mean(within), mean(across));
  EXPECT_GT(mean(within), 0.5);
  EXPECT_LT(mean(across), 0.5 * mean(within));
}

// ---- random small configs (RapidCheck; seed fixed by RC_PARAMS, printed on failure) ----

RC_GTEST_PROP(Synth, SmallConfigsAreWellFormed, ()) {
  SynthConfig c;
  c.layers = *rc::gen::inRange(1, 3);
  c.kv_heads = *rc::gen::inRange(1, 4);
  c.q_heads = c.kv_heads * *rc::gen::inRange(1, 5);
  c.head_dim = 2 * *rc::gen::inRange(1, 17);
  c.prompt = *rc::gen::inRange<std::int64_t>(1, 40);
  c.decode = *rc::gen::inRange<std::int64_t>(0, 6);
  c.seed = *rc::gen::arbitrary<std::uint64_t>();
  c.dtype = *rc::gen::element(DType::kF32, DType::kF16, DType::kBF16);
  c.sinks = *rc::gen::inRange(0, static_cast<int>(std::min<std::int64_t>(c.prompt, 4)) + 1);
  c.retrieval_heads = std::min(c.retrieval_heads, c.q_heads);
  const int layer = *rc::gen::inRange(0, c.layers);
  const LayerData l = traces::synth_layer(c, layer);
  RC_ASSERT(l.prefill_k.shape == (std::vector<std::int64_t>{c.kv_heads, c.prompt, c.head_dim}));
  RC_ASSERT(l.decode_q.shape == (std::vector<std::int64_t>{c.q_heads, c.decode, c.head_dim}));
  for (const Tensor* t : {&l.prefill_q, &l.prefill_k, &l.prefill_v, &l.decode_q, &l.decode_k, &l.decode_v, &*l.decode_o})
    for (float x : t->data) RC_ASSERT(std::isfinite(x) && round_to_dtype(x, c.dtype) == x);
  for (int qh = 0; qh < c.q_heads; ++qh) {
    double sum = 0;
    for (std::int64_t t = 0; t < c.prompt; ++t) sum += l.attn_colsum->at(qh, t);
    RC_ASSERT(std::abs(sum - static_cast<double>(c.prompt)) <= 1e-4 * static_cast<double>(c.prompt));
  }
  RC_ASSERT(same_layer(l, traces::synth_layer(c, layer)));
}

// ---- validation ----

TEST(Synth, ValidateRejectsBadConfigsNamingTheField) {
  const std::vector<std::pair<std::function<void(SynthConfig&)>, std::string>> cases = {
      {[](SynthConfig& c) { c.layers = 0; }, "layers"},
      {[](SynthConfig& c) { c.q_heads = 0; }, "q_heads"},
      {[](SynthConfig& c) { c.kv_heads = 0; }, "kv_heads"},
      {[](SynthConfig& c) { c.q_heads = 6; c.kv_heads = 4; }, "q_heads"},
      {[](SynthConfig& c) { c.head_dim = 63; }, "head_dim"},
      {[](SynthConfig& c) { c.head_dim = 0; }, "head_dim"},
      {[](SynthConfig& c) { c.head_dim = -2; }, "head_dim"},
      {[](SynthConfig& c) { c.prompt = 0; }, "prompt"},
      {[](SynthConfig& c) { c.decode = -1; }, "decode"},
      {[](SynthConfig& c) { c.rope_theta = 0; }, "rope_theta"},
      {[](SynthConfig& c) { c.rope_theta = NAN; }, "rope_theta"},
      {[](SynthConfig& c) { c.sinks = -1; }, "sinks"},
      {[](SynthConfig& c) { c.sinks = 513; }, "sinks"},
      {[](SynthConfig& c) { c.heavy_fraction = 1; }, "heavy_fraction"},
      {[](SynthConfig& c) { c.key_rho = 1; }, "key_rho"},
      {[](SynthConfig& c) { c.segment_break = -0.1; }, "segment_break"},
      {[](SynthConfig& c) { c.lowfreq_tilt = -1; }, "lowfreq_tilt"},
      {[](SynthConfig& c) { c.early_layer_focus = 2; }, "early_layer_focus"},
      {[](SynthConfig& c) { c.needle_depth = 1.5; }, "needle_depth"},
      {[](SynthConfig& c) { c.retrieval_heads = 9; }, "retrieval_heads"},
      {[](SynthConfig& c) { c.question_len = -1; }, "question_len"},
      {[](SynthConfig& c) { c.sink_logit = INFINITY; }, "sink_logit"},
      {[](SynthConfig& c) { c.needle_logit = NAN; }, "needle_logit"},
  };
  for (const auto& [mutate, field] : cases) {
    SynthConfig c;
    mutate(c);
    try {
      traces::validate(c);
      ADD_FAILURE() << "accepted a bad " << field;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kUsage);
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
    EXPECT_THROW((void)traces::synth_layer(c, 0), Error) << field;
  }
  EXPECT_NO_THROW(traces::validate(SynthConfig{}));
  EXPECT_THROW((void)traces::synth_layer(SynthConfig{}, 4), Error);   // layer out of range
  EXPECT_THROW((void)traces::synth_layer(SynthConfig{}, -1), Error);
}
