// CPU prefill of the eviction families. Hot parts (scores, top-k) run the
// optimized/cpu kernels on the layer's storage; decisions call the reference.
#include <algorithm>
#include <functional>
#include <map>

#include "cpu_families.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/opt/backend.hpp"
#include "kvscope/opt/cpu/scores.hpp"
#include "kvscope/reference/methods/adakv.hpp"
#include "kvscope/reference/methods/h2o.hpp"
#include "kvscope/reference/methods/pyramidkv.hpp"
#include "kvscope/reference/methods/snapkv.hpp"
#include "kvscope/reference/methods/tova.hpp"
#include "kvscope/reference/registry.hpp"

namespace kvscope::opt {

cpu::Reduce to_cpu(ref::Reduce r) {
  return r == ref::Reduce::kSum ? cpu::Reduce::kSum : r == ref::Reduce::kMean ? cpu::Reduce::kMean : cpu::Reduce::kMax;
}
cpu::Pool to_cpu(ref::Pool p) {
  return p == ref::Pool::kNone ? cpu::Pool::kNone : p == ref::Pool::kAvg ? cpu::Pool::kAvg : cpu::Pool::kMax;
}

const float* accumulated_attention(const LayerStorage& in, std::vector<float>& computed) {
  if (!in.attn_colsum.empty()) return in.attn_colsum.data();
  computed.resize(static_cast<std::size_t>(in.shape.q_heads * in.shape.tokens));
  cpu::dispatch_storage(in.k.dtype(), [&](auto tag) {
    using S = decltype(tag);
    cpu::accumulated_attention(in.shape, in.q.data<S>(), in.k.data<S>(), false, computed.data());
  });
  return computed.data();
}

std::vector<float> window_scores(const LayerStorage& in, std::int64_t window, cpu::Reduce rows) {
  std::vector<float> out(static_cast<std::size_t>(in.shape.q_heads * in.shape.tokens));
  cpu::dispatch_storage(in.k.dtype(), [&](auto tag) {
    using S = decltype(tag);
    cpu::window_scores(in.shape, in.q.data<S>(), in.k.data<S>(), window, rows, out.data());
  });
  return out;
}

namespace {

/// SnapKV eq. 1 + pooling + GQA reduction on the CPU (ref::snapkv_scores).
ScoreSet snapkv_scores(const LayerStorage& in, std::int64_t budget, const ref::SnapKVConfig& c,
                       const std::string& family) {
  const std::int64_t T = in.shape.tokens, w = std::min(c.window, T), past = T - w;
  const int hq = in.shape.q_heads, hkv = in.shape.kv_heads;
  ScoreSet out{hkv, T, std::vector<float>(static_cast<std::size_t>(hkv * T), 0.0f),
               ref::snapkv_protected(T, budget, c, family)};
  std::vector<float> per_q = window_scores(in, w, to_cpu(c.rows));
  // Only the past keys [0, T - w) are candidates, and pooling sees only them.
  std::vector<float> past_q(static_cast<std::size_t>(hq * past)), tmp(static_cast<std::size_t>(past));
  for (int h = 0; h < hq; ++h) {
    float* dst = past_q.data() + static_cast<std::int64_t>(h) * past;
    std::copy(per_q.data() + static_cast<std::int64_t>(h) * T, per_q.data() + static_cast<std::int64_t>(h) * T + past, dst);
    if (c.gqa == ref::GqaMode::kPoolThenGroup) {
      cpu::pool1d(dst, past, c.kernel, to_cpu(c.pool), tmp.data());
      std::copy(tmp.begin(), tmp.end(), dst);
    }
  }
  std::vector<float> grouped(static_cast<std::size_t>(hkv * past));
  cpu::group_reduce(past_q.data(), hq, hkv, past, to_cpu(c.group), grouped.data());
  for (int g = 0; g < hkv; ++g) {
    const float* src = grouped.data() + static_cast<std::int64_t>(g) * past;
    float* dst = out.scores.data() + static_cast<std::int64_t>(g) * T;
    if (c.gqa == ref::GqaMode::kGroupThenPool)
      cpu::pool1d(src, past, c.kernel, to_cpu(c.pool), dst);
    else
      std::copy(src, src + past, dst);
  }
  return out;
}

class SnapKVScorer final : public BackendScorer {
 public:
  SnapKVScorer(ref::SnapKVConfig c, std::string family) : c_(c), family_(std::move(family)) {}
  ScoreSet score(const LayerStorage& in, std::int64_t budget) const override {
    return snapkv_scores(in, budget, c_, family_);
  }

 private:
  ref::SnapKVConfig c_;
  std::string family_;
};

/// Score-then-top-k with every head at the layer budget.
class ScoredEviction final : public BackendMethod {
 public:
  ScoredEviction(std::unique_ptr<BackendScorer> scorer, std::string family)
      : scorer_(std::move(scorer)), family_(std::move(family)) {}
  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    const std::vector<std::int64_t> budgets(static_cast<std::size_t>(in.shape.kv_heads), budget);
    return ref::LayerPlans::uniform(select_per_head(scorer_->score(in, budget), budgets, family_), budget);
  }
  const BackendScorer* scorer() const override { return scorer_.get(); }

 private:
  std::unique_ptr<BackendScorer> scorer_;
  std::string family_;
};

class H2OScorer final : public BackendScorer {
 public:
  explicit H2OScorer(const ref::H2OConfig& c) : c_(c) {}
  ScoreSet score(const LayerStorage& in, std::int64_t budget) const override {
    const std::int64_t T = in.shape.tokens;
    const int hq = in.shape.q_heads, hkv = in.shape.kv_heads;
    std::vector<float> computed;
    const float* acc = accumulated_attention(in, computed);
    ScoreSet out{hkv, T, std::vector<float>(static_cast<std::size_t>(hkv * T)), {}};
    cpu::group_reduce(acc, hq, hkv, T, to_cpu(c_.gqa), out.scores.data());
    if (c_.per_query)  // ObservedAttentionPress: column j over the T - j queries that saw it
      for (int g = 0; g < hkv; ++g)
        for (std::int64_t j = 0; j < T; ++j) out.scores[static_cast<std::size_t>(g * T + j)] /= static_cast<float>(T - j);
    out.protected_tokens = ref::index_range(std::max<std::int64_t>(0, T - c_.recent(budget)), T);
    return out;
  }

 private:
  ref::H2OConfig c_;
};

class TovaScorer final : public BackendScorer {
 public:
  explicit TovaScorer(bool keep_last) : keep_last_(keep_last) {}
  ScoreSet score(const LayerStorage& in, std::int64_t budget) const override {
    const std::int64_t T = in.shape.tokens;
    const int hq = in.shape.q_heads, hkv = in.shape.kv_heads;
    // The last query's attention, averaged over every q head: one vector for all kv heads.
    const std::vector<float> per_q = window_scores(in, 1, cpu::Reduce::kSum);
    std::vector<float> layer(static_cast<std::size_t>(T));
    cpu::group_reduce(per_q.data(), hq, 1, T, cpu::Reduce::kMean, layer.data());
    ScoreSet out{hkv, T, {}, ref::tova_protected(T, budget, keep_last_)};
    for (int g = 0; g < hkv; ++g) out.scores.insert(out.scores.end(), layer.begin(), layer.end());
    return out;
  }

 private:
  bool keep_last_;
};

class KNormScorer final : public BackendScorer {
 public:
  KNormScorer(std::int64_t sinks, std::int64_t window) : sinks_(sinks), window_(window) {}
  ScoreSet score(const LayerStorage& in, std::int64_t) const override {
    const std::int64_t T = in.shape.tokens;
    ScoreSet out{in.shape.kv_heads, T, std::vector<float>(static_cast<std::size_t>(in.shape.kv_heads * T)), {}};
    cpu::dispatch_storage(in.k.dtype(), [&](auto tag) {
      using S = decltype(tag);
      cpu::key_norm_scores(in.shape, in.k.data<S>(), out.scores.data());
    });
    out.protected_tokens = ref::merge_sorted(ref::index_range(0, std::min(sinks_, T)),
                                             ref::index_range(std::max<std::int64_t>(0, T - window_), T));
    return out;
  }

 private:
  std::int64_t sinks_, window_;
};

class KNorm final : public BackendMethod {
 public:
  explicit KNorm(const ref::Params& p)
      : skip_layers_(p.integer("skip_layers", 0)), scorer_(p.integer("sinks", 0), p.integer("window", 0)) {}
  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    const std::int64_t T = in.shape.tokens;
    const auto heads = static_cast<std::size_t>(in.shape.kv_heads);
    if (in.layer < skip_layers_) return ref::LayerPlans::uniform(std::vector<Plan>(heads, Plan::identity(T)), T);
    const std::vector<std::int64_t> budgets(heads, budget);
    return {select_per_head(scorer_.score(in, budget), budgets, "knorm"), budgets};
  }
  const BackendScorer* scorer() const override { return &scorer_; }

 private:
  std::int64_t skip_layers_;
  KNormScorer scorer_;
};

class PyramidKV final : public BackendMethod {
 public:
  explicit PyramidKV(const ref::Params& p)
      : c_(ref::snapkv_config(p, "pyramidkv")),
        beta_(p.integer("beta", 1)),
        schedule_(p.choice("schedule", {"integer", "float"}) == "integer" ? ref::PyramidSchedule::kInteger
                                                                          : ref::PyramidSchedule::kFloat) {}
  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    const std::int64_t T = in.shape.tokens;
    const std::int64_t b =
        ref::pyramid_budgets(in.meta->layers, T, budget, c_.window, beta_, schedule_)[static_cast<std::size_t>(in.layer)];
    const std::vector<std::int64_t> budgets(static_cast<std::size_t>(in.shape.kv_heads), b);
    return ref::LayerPlans::uniform(select_per_head(snapkv_scores(in, b, c_, "pyramidkv"), budgets, "pyramidkv"), b);
  }

 private:
  ref::SnapKVConfig c_;
  std::int64_t beta_;
  ref::PyramidSchedule schedule_;
};

class AdaKV final : public BackendMethod {
 public:
  explicit AdaKV(const ref::Params& p) : base_(make_cpu_method(ref::adakv_base(p))), o_(ref::adakv_options(p)) {
    if (!base_->scorer())
      throw Error(ErrorKind::kUsage, "adakv: base '" + p.text("base") + "' has no prefill scorer on the cpu backend");
  }
  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    const ScoreSet s = base_->scorer()->score(in, budget);
    ref::LayerPlans out;
    out.head_budgets = ref::adakv_budgets(s.to_reference(), in.shape.tokens, budget, o_);
    out.plans = select_per_head(s, out.head_budgets, "adakv");
    return out;
  }

 private:
  std::unique_ptr<BackendMethod> base_;
  ref::AdaKVOptions o_;
};

/// Methods whose prefill is position arithmetic only (no kernel): the
/// reference's decision on a shape-only input (K with T rows and no columns).
class PositionOnly final : public BackendMethod {
 public:
  explicit PositionOnly(const MethodSpec& spec) : ref_(ref::make_method(spec)) {}
  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    ref::LayerInput shape_only;
    shape_only.meta = in.meta;
    shape_only.layer = in.layer;
    shape_only.k.assign(static_cast<std::size_t>(in.shape.kv_heads), ref::MatX(in.shape.tokens, 0));
    shape_only.v = shape_only.k;
    return ref_->prefill(shape_only, budget);
  }

 private:
  std::unique_ptr<ref::Method> ref_;
};

using Maker = std::function<std::unique_ptr<BackendMethod>(const MethodSpec&, const ref::ResolvedSpec&)>;

const std::map<std::string, Maker>& makers() {
  static const std::map<std::string, Maker> m = {
      {"full", [](const MethodSpec& s, const ref::ResolvedSpec&) { return std::make_unique<PositionOnly>(s); }},
      {"streaming_llm", [](const MethodSpec& s, const ref::ResolvedSpec&) { return std::make_unique<PositionOnly>(s); }},
      {"knorm", [](const MethodSpec&, const ref::ResolvedSpec& r) { return std::make_unique<KNorm>(r.params); }},
      {"snapkv",
       [](const MethodSpec&, const ref::ResolvedSpec& r) {
         return std::make_unique<ScoredEviction>(
             std::make_unique<SnapKVScorer>(ref::snapkv_config(r.params, "snapkv"), "snapkv"), "snapkv");
       }},
      {"pyramidkv", [](const MethodSpec&, const ref::ResolvedSpec& r) { return std::make_unique<PyramidKV>(r.params); }},
      {"adakv", [](const MethodSpec&, const ref::ResolvedSpec& r) { return std::make_unique<AdaKV>(r.params); }},
      {"h2o",
       [](const MethodSpec&, const ref::ResolvedSpec& r) {
         return std::make_unique<ScoredEviction>(std::make_unique<H2OScorer>(ref::h2o_config(r.params)), "h2o");
       }},
      {"tova",
       [](const MethodSpec&, const ref::ResolvedSpec& r) {
         return std::make_unique<ScoredEviction>(std::make_unique<TovaScorer>(r.params.boolean("keep_last")), "tova");
       }},
      {"kvmerger", [](const MethodSpec&, const ref::ResolvedSpec& r) { return make_cpu_kvmerger(r.params); }},
      {"weightedkv", [](const MethodSpec&, const ref::ResolvedSpec& r) { return make_cpu_weightedkv(r.params); }},
      {"ems", [](const MethodSpec&, const ref::ResolvedSpec& r) { return make_cpu_ems(r.params); }},
      {"cam", [](const MethodSpec& s, const ref::ResolvedSpec& r) { return make_cpu_cam(s, r.params); }},
      {"dynamickv", [](const MethodSpec&, const ref::ResolvedSpec& r) { return make_cpu_dynamickv(r.params); }},
  };
  return m;
}

}  // namespace

std::vector<std::string> cpu_families() {
  std::vector<std::string> out;
  for (const auto& f : ref::method_families())
    if (makers().count(f.family)) out.push_back(f.family);
  return out;
}

std::unique_ptr<BackendMethod> make_cpu_method(const MethodSpec& spec) {
  const ref::ResolvedSpec r = ref::resolve_spec(spec);  // unknown names fail here, as for the reference
  const auto it = makers().find(spec.family);
  if (it == makers().end()) {
    std::string list;
    for (const std::string& f : cpu_families()) list += (list.empty() ? "" : ", ") + f;
    throw Error(ErrorKind::kUsage, "method '" + spec.family + "' has no cpu backend yet (cpu backend: " + list +
                                       "); use --backend reference");
  }
  r.family->make(r.preset, r.params);  // the reference's own parameter checks, once
  return it->second(spec, r);
}

}  // namespace kvscope::opt
