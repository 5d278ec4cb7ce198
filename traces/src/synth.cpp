// Synthetic trace generator. The model, every knob and why methods care are in
// docs/synthetic-traces.md; this file is that model, nothing more.
//
// Determinism: every random number comes from std::mt19937_64 (its output is
// fixed by the standard) seeded per (stream, layer, head) by splitmix64, and
// normals come from our own Marsaglia polar method (std::normal_distribution is
// implementation-defined). q/k/v are computed with plain loops (no reordered
// reductions) and rounded to the storage dtype.
#include "kvscope/traces/synth.hpp"

#include <algorithm>
#include <cmath>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/attention.hpp"

namespace kvscope::traces {
namespace {

using Vec = std::vector<double>;

// Per-coordinate RMS of each component (a vector component has norm a*sqrt(d)).
// Query components are then sized so each planted token gets its *_logit.
constexpr double kKeyMean = 1.0, kKeyLatent = 1.0, kKeyNoise = 0.3;
constexpr double kSinkKey = 2.0, kHeavyKey = 1.5, kNeedleKey = 2.0;
constexpr double kQueryNoise = 0.3;
constexpr double kValueMean = 0.5, kValueLatent = 0.5, kValueNoise = 1.0;
constexpr double kSinkValue = 0.1;    // sinks are "no-op" tokens: near-zero values
constexpr double kNeedleValue = 3.0;  // the needle's value stands out in the output

// Independent random streams; the tag is part of the seed.
enum class Stream : std::uint64_t { kDocument = 1, kLayer = 2, kKeys = 3, kValues = 4, kQueries = 5 };

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// seed(s, stream, layer, head) = f(f(f(f(s) ^ stream) ^ layer) ^ head), f = splitmix64.
std::uint64_t stream_seed(std::uint64_t seed, Stream stream, int layer, int head) {
  std::uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ static_cast<std::uint64_t>(stream));
  h = splitmix64(h ^ static_cast<std::uint64_t>(layer));
  return splitmix64(h ^ static_cast<std::uint64_t>(head));
}

class Rng {
 public:
  Rng(const SynthConfig& c, Stream stream, int layer, int head) : engine_(stream_seed(c.seed, stream, layer, head)) {}

  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }  // [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  std::uint64_t below(std::uint64_t n) { return engine_() % n; }  // bias < n / 2^64

  double normal() {  // Marsaglia polar method; pairs are used in order
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u, v, s;
    do {
      u = 2.0 * uniform() - 1.0;
      v = 2.0 * uniform() - 1.0;
      s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    const double f = std::sqrt(-2.0 * std::log(s) / s);
    spare_ = v * f;
    has_spare_ = true;
    return u * f;
  }

 private:
  std::mt19937_64 engine_;
  bool has_spare_ = false;
  double spare_ = 0.0;
};

double dot(const Vec& a, const Vec& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Normal vector shaped by `amp` (E|x|^2 = sum amp^2).
Vec shaped_normal(Rng& rng, const Vec& amp) {
  Vec x(amp.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = amp[i] * rng.normal();
  return x;
}

// A unit direction shaped by `amp`, orthogonal to the (unit) `others` when the
// dimension leaves room (tiny heads keep the raw draw).
Vec direction(Rng& rng, const Vec& amp, const std::vector<Vec>& others) {
  Vec x = shaped_normal(rng, amp);
  Vec y = x;
  for (const Vec& o : others) {
    const double p = dot(y, o);
    for (std::size_t i = 0; i < y.size(); ++i) y[i] -= p * o[i];
  }
  if (dot(y, y) > 1e-2 * dot(x, x)) x = y;
  const double n = std::sqrt(dot(x, x));
  for (double& v : x) v /= n;
  return x;
}

// Amplitude per coordinate. RoPE pair i (coordinates i, i + d/2) turns by
// theta^(-2i/d) per token, so energy in the slow (high i) pairs keeps adjacent
// keys similar after rotation. Mean square 1.
Vec spectral_amplitude(int d, double tilt) {
  const int half = d / 2;
  Vec amp(static_cast<std::size_t>(d));
  double total = 0.0;
  for (int i = 0; i < half; ++i) {
    const double x = half > 1 ? static_cast<double>(i) / (half - 1) : 1.0;
    const double e = std::exp(-tilt * (1.0 - x));
    amp[static_cast<std::size_t>(i)] = amp[static_cast<std::size_t>(i + half)] = e;
    total += 2.0 * e;
  }
  for (double& a : amp) a = std::sqrt(a * d / total);
  return amp;
}

// The slowest eighth of the pairs (at least one): the planted directions live
// there, so the score they give barely depends on the query-key distance.
Vec slow_amplitude(const Vec& amp) {
  const std::size_t d = amp.size(), half = d / 2, slow = std::max<std::size_t>(1, half / 8);
  Vec s(d, 0.0);
  for (std::size_t i = half - slow; i < half; ++i) s[i] = s[i + half] = amp[i];
  return s;
}

// Scale of all planted logits in `layer`: early layers attend broadly.
double layer_focus(const SynthConfig& c, int layer) {
  const double ramp = std::max(1.0, c.layers / 8.0);
  return c.early_layer_focus + (1.0 - c.early_layer_focus) * std::min(1.0, layer / ramp);
}

std::span<float> row_at(Tensor& prefill, Tensor& decode, std::int64_t head, std::int64_t t, std::int64_t T) {
  return t < T ? prefill.row(head, t) : decode.row(head, t - T);
}

// Rotates a pre-RoPE vector to absolute position t and rounds it to the dtype.
void store_rotated(std::span<float> dst, const Vec& x, std::int64_t t, const SynthConfig& c) {
  const ref::VecX y = ref::rope_rotate(Eigen::Map<const ref::VecX>(x.data(), static_cast<Eigen::Index>(x.size())),
                                       static_cast<double>(t), c.rope_theta);
  for (std::size_t i = 0; i < dst.size(); ++i)
    dst[i] = round_to_dtype(static_cast<float>(y[static_cast<Eigen::Index>(i)]), c.dtype);
}

void store_plain(std::span<float> dst, const Vec& x, DType dtype) {
  for (std::size_t i = 0; i < dst.size(); ++i) dst[i] = round_to_dtype(static_cast<float>(x[i]), dtype);
}

void require(bool ok, const std::string& message) {
  if (!ok) throw Error(ErrorKind::kUsage, "synth: " + message);
}

}  // namespace

void validate(const SynthConfig& c) {
  const ReadLimits lim;  // a generated trace must be readable
  require(c.layers >= 1 && c.layers <= lim.max_layers, "layers must be in 1.." + std::to_string(lim.max_layers));
  require(c.kv_heads >= 1 && c.kv_heads <= lim.max_heads, "kv_heads must be in 1.." + std::to_string(lim.max_heads));
  require(c.q_heads >= 1 && c.q_heads <= lim.max_heads, "q_heads must be in 1.." + std::to_string(lim.max_heads));
  require(c.q_heads % c.kv_heads == 0, "q_heads (" + std::to_string(c.q_heads) + ") must be a multiple of kv_heads (" +
                                           std::to_string(c.kv_heads) + ")");
  require(c.head_dim > 0 && c.head_dim % 2 == 0 && c.head_dim <= lim.max_head_dim,
          "head_dim (" + std::to_string(c.head_dim) + ") must be even and in 2.." + std::to_string(lim.max_head_dim));
  require(c.prompt >= 1 && c.prompt <= lim.max_prompt, "prompt must be in 1.." + std::to_string(lim.max_prompt));
  require(c.decode >= 0 && c.decode <= lim.max_decode, "decode must be in 0.." + std::to_string(lim.max_decode));
  require(std::isfinite(c.rope_theta) && c.rope_theta > 0, "rope_theta must be finite and > 0");
  require(c.sinks >= 0 && c.sinks <= c.prompt, "sinks must be in 0..prompt");
  require(c.heavy_fraction >= 0 && c.heavy_fraction < 1, "heavy_fraction must be in [0, 1)");
  require(c.key_rho >= 0 && c.key_rho < 1, "key_rho must be in [0, 1)");
  require(c.segment_break >= 0 && c.segment_break <= 1, "segment_break must be in [0, 1]");
  require(std::isfinite(c.lowfreq_tilt) && c.lowfreq_tilt >= 0 && c.lowfreq_tilt <= 50,
          "lowfreq_tilt must be in [0, 50]");
  require(c.early_layer_focus >= 0 && c.early_layer_focus <= 1, "early_layer_focus must be in [0, 1]");
  require(c.needle_depth >= 0 && c.needle_depth <= 1, "needle_depth must be in [0, 1]");
  require(c.retrieval_heads >= 0 && c.retrieval_heads <= c.q_heads, "retrieval_heads must be in 0..q_heads");
  require(c.question_len >= 0, "question_len must be >= 0");  // longer than the prompt: the whole prompt
  for (const auto& [name, v] : {std::pair{"sink_logit", c.sink_logit}, std::pair{"heavy_logit", c.heavy_logit},
                                std::pair{"local_logit", c.local_logit}, std::pair{"needle_logit", c.needle_logit}})
    require(std::isfinite(v) && std::abs(v) <= 100, std::string(name) + " (" + std::to_string(v) + ") must be in [-100, 100]");
}

TraceMeta synth_meta(const SynthConfig& c) {
  validate(c);
  TraceMeta m;
  m.producer = "kvscope synth";
  m.model = "synthetic";
  m.layers = c.layers;
  m.q_heads = c.q_heads;
  m.kv_heads = c.kv_heads;
  m.head_dim = c.head_dim;
  m.prompt_len = c.prompt;
  m.decode_steps = c.decode;
  m.rope_theta = c.rope_theta;
  m.keys_post_rope = true;
  m.dtype = c.dtype;
  m.has_decode_outputs = c.record_outputs;
  m.has_attn_colsum = c.record_colsum;
  return m;
}

SynthPlanted synth_planted(const SynthConfig& c, int layer) {
  validate(c);
  require(layer >= 0 && layer < c.layers, "layer " + std::to_string(layer) + " out of range");
  SynthPlanted p;
  for (std::int64_t t = 0; t < c.sinks; ++t) p.sinks.push_back(t);
  if (c.needle && c.sinks < c.prompt) {
    const auto at = static_cast<std::int64_t>(std::floor(c.needle_depth * static_cast<double>(c.prompt)));
    p.needle = std::clamp<std::int64_t>(at, c.sinks, c.prompt - 1);
  }
  // Heavy hitters are properties of the text: one draw per token, shared by all layers.
  Rng doc(c, Stream::kDocument, 0, 0);
  for (std::int64_t t = 0; t < c.prompt + c.decode; ++t)
    if (doc.uniform() < c.heavy_fraction && t >= c.sinks && t != p.needle) p.heavy.push_back(t);
  if (p.needle >= 0) {  // the first retrieval_heads of a seeded shuffle of the q heads
    Rng rng(c, Stream::kLayer, layer, 0);
    std::vector<int> heads(static_cast<std::size_t>(c.q_heads));
    for (int h = 0; h < c.q_heads; ++h) heads[static_cast<std::size_t>(h)] = h;
    for (std::size_t i = 0; i < static_cast<std::size_t>(c.retrieval_heads); ++i)
      std::swap(heads[i], heads[i + rng.below(heads.size() - i)]);
    p.retrieval_heads.assign(heads.begin(), heads.begin() + c.retrieval_heads);
    std::sort(p.retrieval_heads.begin(), p.retrieval_heads.end());
  }
  return p;
}

LayerData synth_layer(const SynthConfig& c, int layer) {
  const SynthPlanted planted = synth_planted(c, layer);
  const std::int64_t T = c.prompt, S = c.decode, N = T + S, d = c.head_dim;
  const int group = c.q_heads / c.kv_heads;
  const double sqrt_d = std::sqrt(static_cast<double>(d));
  const double focus = layer_focus(c, layer);
  const Vec amp = spectral_amplitude(c.head_dim, c.lowfreq_tilt), slow = slow_amplitude(amp);
  const auto ud = static_cast<std::size_t>(d);

  enum Role : unsigned char { kPlain, kSink, kHeavy, kNeedle };
  std::vector<Role> role(static_cast<std::size_t>(N), kPlain);
  for (auto t : planted.sinks) role[static_cast<std::size_t>(t)] = kSink;
  for (auto t : planted.heavy) role[static_cast<std::size_t>(t)] = kHeavy;
  if (planted.needle >= 0) role[static_cast<std::size_t>(planted.needle)] = kNeedle;
  // Retrieval queries: the question at the end of the prompt, and every decode step.
  const auto retrieves = [&](std::int64_t p) { return planted.needle >= 0 && p > planted.needle && p >= T - c.question_len; };

  LayerData out;
  out.prefill_q = Tensor({c.q_heads, T, d});
  out.decode_q = Tensor({c.q_heads, S, d});
  out.prefill_k = Tensor({c.kv_heads, T, d});
  out.prefill_v = Tensor({c.kv_heads, T, d});
  out.decode_k = Tensor({c.kv_heads, S, d});
  out.decode_v = Tensor({c.kv_heads, S, d});

  for (int h = 0; h < c.kv_heads; ++h) {
    // Keys: mean + AR(1) latent z (restarting at segment breaks) + noise + planted parts.
    Rng kr(c, Stream::kKeys, layer, h);
    const Vec m = direction(kr, amp, {});
    const Vec s = direction(kr, slow, {m});
    const Vec u = direction(kr, slow, {m, s});
    const Vec n = direction(kr, slow, {m, s, u});
    const double rho = std::pow(c.key_rho, kr.uniform(0.5, 2.0));  // heads differ in smoothness
    const double p_break = std::min(1.0, c.segment_break * kr.uniform(0.5, 2.0));
    std::vector<Vec> z(static_cast<std::size_t>(N));
    std::vector<bool> breaks(static_cast<std::size_t>(N));
    for (std::int64_t t = 0; t < N; ++t) {
      const auto ut = static_cast<std::size_t>(t);
      breaks[ut] = kr.uniform() < p_break || t == 0;
      Vec eta = shaped_normal(kr, amp);
      const Vec eps = shaped_normal(kr, amp);
      // The latent stays out of the planted directions: it shares their slow
      // pairs, and any overlap would turn into large random sink/needle scores.
      for (const Vec* o : {&s, &u, &n}) {
        const double p = dot(eta, *o);
        for (std::size_t i = 0; i < ud; ++i) eta[i] -= p * (*o)[i];
      }
      Vec& zt = z[ut];
      zt.resize(ud);
      const double keep = breaks[ut] ? 0.0 : rho, fresh = std::sqrt(1.0 - keep * keep) * kKeyLatent;
      for (std::size_t i = 0; i < ud; ++i) zt[i] = (breaks[ut] ? 0.0 : keep * z[ut - 1][i]) + fresh * eta[i];
      Vec k(ud);
      for (std::size_t i = 0; i < ud; ++i) k[i] = kKeyMean * sqrt_d * m[i] + zt[i] + kKeyNoise * eps[i];
      const double extra = role[ut] == kSink ? kSinkKey : role[ut] == kHeavy ? kHeavyKey : role[ut] == kNeedle ? kNeedleKey : 0.0;
      const Vec& dir = role[ut] == kSink ? s : role[ut] == kHeavy ? u : n;
      for (std::size_t i = 0; i < ud; ++i) k[i] += extra * sqrt_d * dir[i];
      store_rotated(row_at(out.prefill_k, out.decode_k, h, t, T), k, t, c);
    }

    // Values: mean + a weak AR(1) latent on the same segments + noise (adjacent
    // values are much less similar than keys); sinks near zero; the needle distinct.
    Rng vr(c, Stream::kValues, layer, h);
    const Vec one(ud, 1.0);
    const Vec mv = direction(vr, one, {}), nv = direction(vr, one, {mv});
    Vec y(ud, 0.0);
    for (std::int64_t t = 0; t < N; ++t) {
      const auto ut = static_cast<std::size_t>(t);
      const double keep = breaks[ut] ? 0.0 : rho, fresh = std::sqrt(1.0 - keep * keep) * kValueLatent;
      Vec v(ud);
      for (std::size_t i = 0; i < ud; ++i) {
        y[i] = keep * y[i] + fresh * vr.normal();
        v[i] = kValueMean * sqrt_d * mv[i] + y[i] + kValueNoise * vr.normal();
      }
      if (role[ut] == kSink)
        for (double& x : v) x *= kSinkValue;
      if (role[ut] == kNeedle)
        for (std::size_t i = 0; i < ud; ++i) v[i] = kNeedleValue * sqrt_d * nv[i];
      store_plain(row_at(out.prefill_v, out.decode_v, h, t, T), v, c.dtype);
    }

    // Queries of the group: aim at the sink, heavy and (retrieval heads) needle
    // directions of their kv head, and at the kv head's current latent (locality).
    for (int g = 0; g < group; ++g) {
      const int qh = h * group + g;
      Rng qr(c, Stream::kQueries, layer, qh);
      const double w_sink = focus * qr.uniform(0.75, 1.25) * c.sink_logit / kSinkKey;
      const double w_heavy = focus * qr.uniform(0.75, 1.25) * c.heavy_logit / kHeavyKey;
      const double w_local = focus * qr.uniform(0.5, 1.5) * c.local_logit / (kKeyLatent * kKeyLatent * sqrt_d);
      const double w_needle = c.needle_logit / kNeedleKey;
      const bool retrieval = std::binary_search(planted.retrieval_heads.begin(), planted.retrieval_heads.end(), qh);
      for (std::int64_t p = 0; p < N; ++p) {
        const Vec& zp = z[static_cast<std::size_t>(p)];
        const double wn = retrieval && retrieves(p) ? w_needle : 0.0;
        Vec q(ud);
        for (std::size_t i = 0; i < ud; ++i)
          q[i] = w_sink * s[i] + w_heavy * u[i] + w_local * zp[i] + wn * n[i] + kQueryNoise * qr.normal();
        store_rotated(row_at(out.prefill_q, out.decode_q, qh, p, T), q, p, c);
      }
    }
  }

  // Derived data, computed from the rounded q/k/v exactly as a reader sees them.
  if (c.record_outputs) {
    out.decode_o = Tensor({c.q_heads, S, d});
    for (int h = 0; h < c.kv_heads; ++h) {
      // The cache grows by one row per step (realloc, not a copy of the cache per query).
      ref::MatX K = ref::to_matrix({out.prefill_k.row(h, 0).data(), static_cast<std::size_t>(T * d)}, T, d);
      ref::MatX V = ref::to_matrix({out.prefill_v.row(h, 0).data(), static_cast<std::size_t>(T * d)}, T, d);
      for (std::int64_t st = 0; st < S; ++st) {
        K.conservativeResize(T + st + 1, d);
        V.conservativeResize(T + st + 1, d);
        K.row(T + st) = ref::to_matrix(out.decode_k.row(h, st), 1, d);
        V.row(T + st) = ref::to_matrix(out.decode_v.row(h, st), 1, d);
        for (int g = 0; g < group; ++g) {
          const int qh = h * group + g;
          const ref::VecX q = ref::to_matrix(out.decode_q.row(qh, st), 1, d).transpose();
          const ref::VecX o = ref::attend(q, K, V).output;
          store_plain(out.decode_o->row(qh, st), Vec(o.data(), o.data() + o.size()), c.dtype);
        }
      }
    }
  }
  if (c.record_colsum) {
    out.attn_colsum = Tensor({c.q_heads, T});
    for (int qh = 0; qh < c.q_heads; ++qh) {
      const int h = ref::kv_head_of(qh, c.q_heads, c.kv_heads);
      const std::size_t rows = static_cast<std::size_t>(T * d);
      const ref::MatX Q = ref::to_matrix({out.prefill_q.row(qh, 0).data(), rows}, T, d);
      const ref::MatX K = ref::to_matrix({out.prefill_k.row(h, 0).data(), rows}, T, d);
      const ref::VecX cs = ref::causal_attention_colsum(Q, K);
      for (std::int64_t t = 0; t < T; ++t) out.attn_colsum->data[static_cast<std::size_t>(qh * T + t)] = static_cast<float>(cs[t]);
    }
  }
  return out;
}

void synth_to_file(const SynthConfig& c, const std::string& path, WriteOptions options) {
  TraceWriter writer(path, synth_meta(c), options);
  for (int l = 0; l < c.layers; ++l) writer.write_layer(l, synth_layer(c, l));
  writer.close();
}

}  // namespace kvscope::traces
