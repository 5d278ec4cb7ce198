// DynamicKV prefill on the CPU. The hot quantity, every q head's pooled window
// scores over the past tokens, is kernels (window_scores, pool1d), computed
// once per layer in the coupling pass; the pass itself and the cross-layer
// budget schedule are the reference's one implementation (ref::DynamicKVPass,
// ref::dynamickv_schedule), which read the fp32 scores as they are; each kv
// head then keeps the window plus its best prefix[l] past tokens by the
// group's mean/max (select_per_head's top-k).
#include "kvscope/reference/methods/dynamickv.hpp"
#include "kvscope/reference/methods/dynamickv_pass.hpp"
#include "kvscope/reference/scores.hpp"
#include "cpu_families.hpp"

namespace kvscope::opt {
namespace {

using Pass = ref::DynamicKVPass<ref::DynamicKVFlatScores>;
constexpr const char* kWho = "dynamickv (cpu)";

/// Pooled window scores of every q head over the Lp = T - w past tokens, [q_heads, Lp].
ref::DynamicKVFlatScores pooled_scores(const LayerStorage& in, const ref::DynamicKVConfig& c) {
  const std::int64_t T = in.shape.tokens, w = c.effective_window(T), Lp = T - w;
  const int hq = in.shape.q_heads;
  const std::vector<float> per_q = window_scores(in, w, cpu::Reduce::kSum);
  ref::DynamicKVFlatScores out{hq, std::vector<float>(static_cast<std::size_t>(hq * Lp))};
  cpu::pool1d_rows(per_q.data(), T, hq, Lp, c.kernel, to_cpu(c.pool), out.values.data(), Lp);
  return out;
}

// The first pass over the kernels' fp32 scores.
class DynamicKVCouplingCpu final : public BackendCoupling {
 public:
  DynamicKVCouplingCpu(const ref::DynamicKVConfig& c, const TraceMeta& meta, std::int64_t budget)
      // The schedule's cross-layer top-k counts the layers on the OpenMP threads (in turn, its
      // three passes over 32 layers' scores took 32-37 ms of a ~215 ms prefill).
      : c_(c), pass_(c, meta.layers, budget, kWho, for_each_on_threads) {}

  void observe(const LayerStorage& in) override { pass_.add_layer(in.layer, in.shape.tokens, pooled_scores(in, c_)); }
  const Pass& pass() const { return pass_; }

 private:
  ref::DynamicKVConfig c_;
  Pass pass_;
};

class DynamicKVCpu final : public BackendMethod {
 public:
  explicit DynamicKVCpu(const ref::Params& p) : c_(ref::dynamickv_config(p)) {}

  std::unique_ptr<BackendCoupling> coupling(const TraceMeta& meta, std::int64_t budget) const override {
    ref::dynamickv_schedule_config(c_, meta.layers, meta.prompt_len, budget);  // fail before any data is read
    return std::make_unique<DynamicKVCouplingCpu>(c_, meta, budget);
  }

  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    const std::int64_t T = in.shape.tokens, w = c_.effective_window(T), Lp = T - w;
    const int hq = in.shape.q_heads, hkv = in.shape.kv_heads;
    const auto* cpl = dynamic_cast<const DynamicKVCouplingCpu*>(in.coupling);
    const Pass::Layer layer = Pass::resolve(cpl ? &cpl->pass() : nullptr, c_, kWho, in.layer,
                                            in.meta ? in.meta->layers : 1, T, budget,
                                            [&] { return pooled_scores(in, c_); });

    // Per kv head: the group's mean/max over the past tokens; the window is protected.
    std::vector<float> grouped(static_cast<std::size_t>(hkv * Lp));
    cpu::group_reduce(layer.scores->values.data(), hq, hkv, Lp, to_cpu(c_.group), grouped.data());
    ScoreSet set{hkv, T, std::vector<float>(static_cast<std::size_t>(hkv * T), 0.0f), ref::index_range(Lp, T)};
    for (int g = 0; g < hkv; ++g)
      std::copy(grouped.begin() + g * Lp, grouped.begin() + (g + 1) * Lp, set.scores.begin() + g * T);
    const std::int64_t kept = layer.prefix + w;
    const std::vector<std::int64_t> budgets(static_cast<std::size_t>(hkv), kept);
    return ref::LayerPlans::uniform(select_per_head(set, budgets, "dynamickv"), kept);
  }

 private:
  ref::DynamicKVConfig c_;
};

}  // namespace

std::unique_ptr<BackendMethod> make_cpu_dynamickv(const ref::Params& p) { return std::make_unique<DynamicKVCpu>(p); }

}  // namespace kvscope::opt
