// DynamicKV prefill on the CPU. The hot quantity, every q head's pooled window
// scores over the past tokens, is kernels (window_scores, pool1d), computed
// once per layer in the coupling pass; the cross-layer budget schedule is the
// reference's one implementation (ref::dynamickv_schedule) over those fp32
// scores, exactly widened; each kv head then keeps the window plus its best
// prefix[l] past tokens by the group's mean/max (select_per_head's top-k).
#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/dynamickv.hpp"
#include "kvscope/reference/scores.hpp"
#include "cpu_families.hpp"

namespace kvscope::opt {
namespace {

/// Pooled window scores of every q head over the Lp = T - w past tokens, [q_heads, Lp].
std::vector<float> pooled_scores(const LayerStorage& in, const ref::DynamicKVConfig& c) {
  const std::int64_t T = in.shape.tokens, w = c.effective_window(T), Lp = T - w;
  const int hq = in.shape.q_heads;
  const std::vector<float> per_q = window_scores(in, w, cpu::Reduce::kSum);
  std::vector<float> out(static_cast<std::size_t>(hq * Lp));
  for (int h = 0; h < hq; ++h)
    cpu::pool1d(per_q.data() + static_cast<std::int64_t>(h) * T, Lp, c.kernel, to_cpu(c.pool),
                out.data() + static_cast<std::int64_t>(h) * Lp);
  return out;
}

/// fp32 scores as the schedule's double vectors (exact).
std::vector<ref::VecX> widen(const std::vector<float>& s, int heads, std::int64_t n) {
  std::vector<ref::VecX> out;
  for (int h = 0; h < heads; ++h) {
    ref::VecX v(n);
    for (std::int64_t j = 0; j < n; ++j) v[j] = s[static_cast<std::size_t>(h * n + j)];
    out.push_back(std::move(v));
  }
  return out;
}

class DynamicKVCouplingCpu final : public BackendCoupling {
 public:
  DynamicKVCouplingCpu(const ref::DynamicKVConfig& c, const TraceMeta& meta, std::int64_t budget)
      : c_(c), layers_(meta.layers), budget_(budget) {}

  void observe(const LayerStorage& in) override {
    if (in.layer != static_cast<int>(scores_.size()))
      throw Error(ErrorKind::kInternal, "dynamickv (cpu): layers must be observed in order (got layer " +
                                            std::to_string(in.layer) + ", expected " +
                                            std::to_string(scores_.size()) + ")");
    if (in.layer == 0) T_ = in.shape.tokens;
    if (in.shape.tokens != T_) throw Error(ErrorKind::kInternal, "dynamickv (cpu): layers disagree on the prompt length");
    const std::vector<float> s = pooled_scores(in, c_);
    scores_.push_back(widen(s, in.shape.q_heads, T_ - c_.effective_window(T_)));
    if (static_cast<int>(scores_.size()) == layers_)
      schedule_ = ref::dynamickv_schedule(scores_, ref::dynamickv_schedule_config(c_, layers_, T_, budget_));
  }

  bool done() const { return static_cast<int>(scores_.size()) == layers_; }
  std::int64_t budget() const { return budget_; }
  const ref::DynamicKVSchedule& schedule() const { return schedule_; }
  const std::vector<ref::VecX>& scores(int layer) const { return scores_.at(static_cast<std::size_t>(layer)); }

 private:
  ref::DynamicKVConfig c_;
  int layers_;
  std::int64_t budget_;
  std::int64_t T_ = 0;
  std::vector<std::vector<ref::VecX>> scores_;  // per layer, per q head (what the schedule reads)
  ref::DynamicKVSchedule schedule_;
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
    const ref::DynamicKVScheduleConfig one_layer = ref::dynamickv_schedule_config(c_, 1, T, budget);
    // The schedule and this layer's scores: from the coupling pass, or (one-layer models only) computed here.
    const auto* cpl = dynamic_cast<const DynamicKVCouplingCpu*>(in.coupling);
    ref::DynamicKVSchedule local;
    std::vector<ref::VecX> local_scores;
    const ref::DynamicKVSchedule* sched = &local;
    const std::vector<ref::VecX>* scores = &local_scores;
    if (cpl) {
      if (!cpl->done()) throw Error(ErrorKind::kUsage, "dynamickv (cpu): the coupling has not observed every layer yet");
      if (cpl->budget() != budget)
        throw Error(ErrorKind::kInternal, "dynamickv (cpu): the coupling was built for budget " +
                                              std::to_string(cpl->budget()) + ", prefill got " + std::to_string(budget));
      sched = &cpl->schedule();
      scores = &cpl->scores(in.layer);
    } else {
      const int layers = in.meta ? in.meta->layers : 1;
      if (layers != 1)
        throw Error(ErrorKind::kUsage, "dynamickv (cpu): prefill of a " + std::to_string(layers) +
                                           "-layer model needs the layer coupling (observe() on every layer first)");
      local_scores = widen(pooled_scores(in, c_), hq, Lp);
      local = ref::dynamickv_schedule({local_scores}, one_layer);
    }
    const std::int64_t k = sched->prefix.at(static_cast<std::size_t>(in.layer));

    // Per kv head: the group's mean/max over the past tokens; the window is protected.
    std::vector<float> per_q(static_cast<std::size_t>(hq * Lp)), grouped(static_cast<std::size_t>(hkv * Lp));
    for (int h = 0; h < hq; ++h)
      for (std::int64_t j = 0; j < Lp; ++j)
        per_q[static_cast<std::size_t>(h * Lp + j)] = static_cast<float>((*scores)[static_cast<std::size_t>(h)][j]);
    cpu::group_reduce(per_q.data(), hq, hkv, Lp, to_cpu(c_.group), grouped.data());
    ScoreSet set{hkv, T, std::vector<float>(static_cast<std::size_t>(hkv * T), 0.0f), ref::index_range(Lp, T)};
    for (int g = 0; g < hkv; ++g)
      std::copy(grouped.begin() + g * Lp, grouped.begin() + (g + 1) * Lp, set.scores.begin() + g * T);
    const std::vector<std::int64_t> budgets(static_cast<std::size_t>(hkv), k + w);
    return ref::LayerPlans::uniform(select_per_head(set, budgets, "dynamickv"), k + w);
  }

 private:
  ref::DynamicKVConfig c_;
};

}  // namespace

std::unique_ptr<BackendMethod> make_cpu_dynamickv(const ref::Params& p) { return std::make_unique<DynamicKVCpu>(p); }

}  // namespace kvscope::opt
