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

const float* accumulated_attention(const LayerStorage& in, std::vector<float>& computed, const ScoreKernels& kernels) {
  if (!in.attn_colsum.empty()) return in.attn_colsum.data();
  computed = kernels.accumulated_attention(in);
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

class CpuScoreKernels final : public ScoreKernels {
 public:
  std::vector<float> window_scores(const LayerStorage& in, std::int64_t window, kern::Reduce rows) const override {
    return opt::window_scores(in, window, rows);
  }
  std::vector<float> accumulated_attention(const LayerStorage& in) const override {
    std::vector<float> out(static_cast<std::size_t>(in.shape.q_heads * in.shape.tokens));
    cpu::dispatch_storage(in.k.dtype(), [&](auto tag) {
      using S = decltype(tag);
      cpu::accumulated_attention(in.shape, in.q.data<S>(), in.k.data<S>(), false, out.data());
    });
    return out;
  }
  std::vector<float> key_norm_scores(const LayerStorage& in) const override {
    std::vector<float> out(static_cast<std::size_t>(in.shape.kv_heads * in.shape.tokens));
    cpu::dispatch_storage(in.k.dtype(), [&](auto tag) {
      using S = decltype(tag);
      cpu::key_norm_scores(in.shape, in.k.data<S>(), out.data());
    });
    return out;
  }
};

const ScoreKernels& cpu_score_kernels() {
  static const CpuScoreKernels kernels;
  return kernels;
}

namespace {

/// SnapKV eq. 1 + pooling + GQA reduction (ref::snapkv_scores); the window scores on `kernels`' device.
ScoreSet snapkv_scores(const LayerStorage& in, std::int64_t budget, const ref::SnapKVConfig& c,
                       const std::string& family, const ScoreKernels& kernels) {
  const std::int64_t T = in.shape.tokens, w = std::min(c.window, T), past = T - w;
  const int hq = in.shape.q_heads, hkv = in.shape.kv_heads;
  ScoreSet out{hkv, T, std::vector<float>(static_cast<std::size_t>(hkv * T), 0.0f),
               ref::snapkv_protected(T, budget, c, family)};
  std::vector<float> per_q = kernels.window_scores(in, w, to_cpu(c.rows));
  // Only the past keys [0, T - w) are candidates, and pooling sees only them.
  std::vector<float> past_q(static_cast<std::size_t>(hq * past));
  // Pooled before or after the GQA reduction (c.gqa); the other pool1d_rows call only copies.
  const bool pool_first = c.gqa == ref::GqaMode::kPoolThenGroup;
  cpu::pool1d_rows(per_q.data(), T, hq, past, c.kernel, pool_first ? to_cpu(c.pool) : cpu::Pool::kNone, past_q.data(), past);
  std::vector<float> grouped(static_cast<std::size_t>(hkv * past));
  cpu::group_reduce(past_q.data(), hq, hkv, past, to_cpu(c.group), grouped.data());
  cpu::pool1d_rows(grouped.data(), past, hkv, past, c.kernel, pool_first ? cpu::Pool::kNone : to_cpu(c.pool),
                   out.scores.data(), T);
  return out;
}

class SnapKVScorer final : public BackendScorer {
 public:
  SnapKVScorer(ref::SnapKVConfig c, std::string family, const ScoreKernels& kernels)
      : c_(c), family_(std::move(family)), kernels_(kernels) {}
  ScoreSet score(const LayerStorage& in, std::int64_t budget) const override {
    return snapkv_scores(in, budget, c_, family_, kernels_);
  }

 private:
  ref::SnapKVConfig c_;
  std::string family_;
  const ScoreKernels& kernels_;
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
  H2OScorer(const ref::H2OConfig& c, const ScoreKernels& kernels) : c_(c), kernels_(kernels) {}
  ScoreSet score(const LayerStorage& in, std::int64_t budget) const override {
    const std::int64_t T = in.shape.tokens;
    const int hq = in.shape.q_heads, hkv = in.shape.kv_heads;
    std::vector<float> computed;
    const float* acc = accumulated_attention(in, computed, kernels_);
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
  const ScoreKernels& kernels_;
};

class TovaScorer final : public BackendScorer {
 public:
  TovaScorer(bool keep_last, const ScoreKernels& kernels) : keep_last_(keep_last), kernels_(kernels) {}
  ScoreSet score(const LayerStorage& in, std::int64_t budget) const override {
    const std::int64_t T = in.shape.tokens;
    const int hq = in.shape.q_heads, hkv = in.shape.kv_heads;
    // The last query's attention, averaged over every q head: one vector for all kv heads.
    const std::vector<float> per_q = kernels_.window_scores(in, 1, cpu::Reduce::kSum);
    std::vector<float> layer(static_cast<std::size_t>(T));
    cpu::group_reduce(per_q.data(), hq, 1, T, cpu::Reduce::kMean, layer.data());
    ScoreSet out{hkv, T, {}, ref::tova_protected(T, budget, keep_last_)};
    for (int g = 0; g < hkv; ++g) out.scores.insert(out.scores.end(), layer.begin(), layer.end());
    return out;
  }

 private:
  bool keep_last_;
  const ScoreKernels& kernels_;
};

class KNormScorer final : public BackendScorer {
 public:
  KNormScorer(std::int64_t sinks, std::int64_t window, const ScoreKernels& kernels)
      : sinks_(sinks), window_(window), kernels_(kernels) {}
  ScoreSet score(const LayerStorage& in, std::int64_t) const override {
    const std::int64_t T = in.shape.tokens;
    ScoreSet out{in.shape.kv_heads, T, kernels_.key_norm_scores(in), {}};
    out.protected_tokens = ref::merge_sorted(ref::index_range(0, std::min(sinks_, T)),
                                             ref::index_range(std::max<std::int64_t>(0, T - window_), T));
    return out;
  }

 private:
  std::int64_t sinks_, window_;
  const ScoreKernels& kernels_;
};

class KNorm final : public BackendMethod {
 public:
  KNorm(const ref::Params& p, const ScoreKernels& kernels)
      : skip_layers_(p.integer("skip_layers", 0)), scorer_(p.integer("sinks", 0), p.integer("window", 0), kernels) {}
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
  PyramidKV(const ref::Params& p, const ScoreKernels& kernels)
      : c_(ref::snapkv_config(p, "pyramidkv")),
        kernels_(kernels),
        beta_(p.integer("beta", 1)),
        schedule_(p.choice("schedule", {"integer", "float"}) == "integer" ? ref::PyramidSchedule::kInteger
                                                                          : ref::PyramidSchedule::kFloat) {}
  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    const std::int64_t T = in.shape.tokens;
    const std::int64_t b =
        ref::pyramid_budgets(in.meta->layers, T, budget, c_.window, beta_, schedule_)[static_cast<std::size_t>(in.layer)];
    const std::vector<std::int64_t> budgets(static_cast<std::size_t>(in.shape.kv_heads), b);
    return ref::LayerPlans::uniform(
        select_per_head(snapkv_scores(in, b, c_, "pyramidkv", kernels_), budgets, "pyramidkv"), b);
  }

 private:
  ref::SnapKVConfig c_;
  const ScoreKernels& kernels_;
  std::int64_t beta_;
  ref::PyramidSchedule schedule_;
};

class AdaKV final : public BackendMethod {
 public:
  AdaKV(const ref::Params& p, std::unique_ptr<BackendMethod> base, const char* backend)
      : base_(std::move(base)), o_(ref::adakv_options(p)) {
    if (!base_->scorer())
      throw Error(ErrorKind::kUsage, "adakv: base '" + p.text("base") + "' has no prefill scorer on the " +
                                         std::string(backend) + " backend");
  }
  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    const ScoreSet s = base_->scorer()->score(in, budget);
    ref::LayerPlans out;
    out.head_budgets = ref::adakv_budgets(s.to_reference(), in.shape.tokens, budget, o_, for_each_on_threads);
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

/// The device a backend method is made for: its name, whether it is the GPU
/// (only the `cuda` families then), and its score kernels, asked for only
/// once the family is known to have a maker (the device check comes last).
struct Device {
  const char* name;
  bool cuda;
  const ScoreKernels& (*kernels)();
};

std::unique_ptr<BackendMethod> make_method(const MethodSpec& spec, const Device& device);

using Maker = std::function<std::unique_ptr<BackendMethod>(const MethodSpec&, const ref::ResolvedSpec&, const Device&)>;

struct Family {
  Maker make;
  bool cuda;  // the score-then-top-k families, whose kernels are ScoreKernels
};

const std::map<std::string, Family>& makers() {
  using R = ref::ResolvedSpec;
  static const std::map<std::string, Family> m = {
      {"full", {[](const MethodSpec& s, const R&, const Device&) { return std::make_unique<PositionOnly>(s); }, true}},
      {"streaming_llm",
       {[](const MethodSpec& s, const R&, const Device&) { return std::make_unique<PositionOnly>(s); }, true}},
      {"knorm",
       {[](const MethodSpec&, const R& r, const Device& d) { return std::make_unique<KNorm>(r.params, d.kernels()); },
        true}},
      {"snapkv",
       {[](const MethodSpec&, const R& r, const Device& d) {
          return std::make_unique<ScoredEviction>(
              std::make_unique<SnapKVScorer>(ref::snapkv_config(r.params, "snapkv"), "snapkv", d.kernels()), "snapkv");
        },
        true}},
      {"pyramidkv",
       {[](const MethodSpec&, const R& r, const Device& d) { return std::make_unique<PyramidKV>(r.params, d.kernels()); },
        true}},
      {"adakv",
       {[](const MethodSpec&, const R& r, const Device& d) {
          return std::make_unique<AdaKV>(r.params, make_method(ref::adakv_base(r.params), d), d.name);
        },
        true}},
      {"h2o",
       {[](const MethodSpec&, const R& r, const Device& d) {
          return std::make_unique<ScoredEviction>(std::make_unique<H2OScorer>(ref::h2o_config(r.params), d.kernels()),
                                                  "h2o");
        },
        true}},
      {"tova",
       {[](const MethodSpec&, const R& r, const Device& d) {
          return std::make_unique<ScoredEviction>(
              std::make_unique<TovaScorer>(r.params.boolean("keep_last"), d.kernels()), "tova");
        },
        true}},
      {"kvmerger", {[](const MethodSpec&, const R& r, const Device&) { return make_cpu_kvmerger(r.params); }, false}},
      {"weightedkv",
       {[](const MethodSpec&, const R& r, const Device&) { return make_cpu_weightedkv(r.params); }, false}},
      {"ems", {[](const MethodSpec&, const R& r, const Device&) { return make_cpu_ems(r.params); }, false}},
      {"cam", {[](const MethodSpec& s, const R& r, const Device&) { return make_cpu_cam(s, r.params); }, false}},
      {"dynamickv", {[](const MethodSpec&, const R& r, const Device&) { return make_cpu_dynamickv(r.params); }, false}},
  };
  return m;
}

std::vector<std::string> families_on(bool cuda) {
  std::vector<std::string> out;
  for (const auto& f : ref::method_families()) {
    const auto it = makers().find(f.family);
    if (it != makers().end() && (!cuda || it->second.cuda)) out.push_back(f.family);
  }
  return out;
}

std::unique_ptr<BackendMethod> make_method(const MethodSpec& spec, const Device& device) {
  const ref::ResolvedSpec r = ref::resolve_spec(spec);  // unknown names fail here, as for the reference
  const auto it = makers().find(spec.family);
  if (it == makers().end() || (device.cuda && !it->second.cuda)) {
    std::string list;
    for (const std::string& f : families_on(device.cuda)) list += (list.empty() ? "" : ", ") + f;
    throw Error(ErrorKind::kUsage, "method '" + spec.family + "' has no " + device.name + " backend yet (" +
                                       device.name + " backend: " + list + "); use --backend " +
                                       (device.cuda ? "cpu or reference" : "reference"));
  }
  r.family->make(r.preset, r.params);  // the reference's own parameter checks, once
  if (device.cuda) device.kernels();  // no device: that error now, for position-only families too
  return it->second.make(spec, r, device);
}

}  // namespace

std::vector<std::string> cpu_families() { return families_on(false); }
std::vector<std::string> cuda_families() { return families_on(true); }

std::unique_ptr<BackendMethod> make_cpu_method(const MethodSpec& spec) {
  return make_method(spec, {"cpu", false, &cpu_score_kernels});
}

std::unique_ptr<BackendMethod> make_cuda_method(const MethodSpec& spec) {
  return make_method(spec, {"cuda", true, &cuda_score_kernels});
}

}  // namespace kvscope::opt
