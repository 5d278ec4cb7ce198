#include "kvscope/reference/methods/dynamickv.hpp"
#include "kvscope/reference/methods/dynamickv_pass.hpp"
#include "kvscope/reference/methods/dynamickv_topk.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <span>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/scorer.hpp"

namespace kvscope::ref {

double python_floordiv(double vx, double wx) {
  // CPython Objects/floatobject.c _float_div_mod, the floor part.
  double mod = std::fmod(vx, wx);
  double div = (vx - mod) / wx;
  if (mod != 0.0) {
    if ((wx < 0) != (mod < 0)) {
      mod += wx;
      div -= 1.0;
    }
  }
  if (div != 0.0) {
    double floordiv = std::floor(div);
    if (div - floordiv > 0.5) floordiv += 1.0;
    return floordiv;
  }
  return std::copysign(0.0, vx / wx);
}

namespace {

// Python's integer a // b.
std::int64_t int_floordiv(std::int64_t a, std::int64_t b) {
  const std::int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

void check_schedule_input(std::size_t layers, const DynamicKVScheduleConfig& c) {
  if (c.layers < 1 || static_cast<int>(layers) != c.layers)
    throw Error(ErrorKind::kUsage, "dynamickv: the schedule needs the scores of all " + std::to_string(c.layers) +
                                       " layers, got " + std::to_string(layers));
  if (c.base < 0 || c.window < 0 || c.interval < 1 || !(c.r_max >= 0))
    throw Error(ErrorKind::kUsage, "dynamickv: schedule needs base >= 0, window >= 0, interval >= 1, r_max >= 0");
}

// The schedule over H heads x Lp scores per layer, `layers[l]` head-major. fp32 scores are read as
// they are: widening them to double would keep their order and ties.
template <class V>
DynamicKVSchedule schedule(std::int64_t H, std::int64_t Lp, const DynamicKVScheduleConfig& c,
                           std::vector<std::span<const V>> layers, const ForEachIndex& for_each_layer = {}) {
  const int L = c.layers;
  const std::int64_t w = c.window, b = c.base;
  DynamicKVSchedule out;
  // budget_compute_per_layer: self.budget_size = min(int(radio_max * base), q_len - window_size).
  out.bmax = std::min(static_cast<std::int64_t>(c.r_max * static_cast<double>(b)), Lp);
  std::vector<DynamicKVEntry> initial;
  for (std::int64_t r = 0; r < out.bmax; ++r) initial.push_back(r);
  for (std::int64_t u = 0; u < w; ++u) initial.push_back(-(u + 1));
  out.layout.assign(static_cast<std::size_t>(L), initial);

  const std::int64_t need = b * L;  // need_fill_kv = base * num_hidden_layers
  // Every re-allocation's selection at once: topk(k=tk) over the first n
  // layers, or numel() when tk exceeds it (the except branch).
  std::vector<PrefixTopKQuery> queries;
  for (std::int64_t l = c.interval - 1; l < L; l += c.interval)
    queries.push_back({static_cast<int>(l + 1), std::min(b * H * (l + 1), H * Lp * (l + 1))});
  std::vector<std::vector<std::int64_t>> selected = prefix_topk_counts<V>(layers, queries, for_each_layer);
  for (std::size_t q = 0; q < queries.size(); ++q) {
    const int n = queries[q].n, l = n - 1;
    DynamicKVUpdate up;
    up.layer = l;
    const std::int64_t tk = b * H * n;
    up.topk = queries[q].k;
    up.counts = std::move(selected[q]);
    for (auto& x : up.counts) x = int_floordiv(x, n);  // counts // gather_attn.shape[0]
    std::int64_t sum_c = std::accumulate(up.counts.begin(), up.counts.end(), std::int64_t{0});
    if (sum_c != H * Lp && l == L - 1) {  // the last layer tops up the last count
      up.counts.back() += int_floordiv(tk, L) - sum_c;
      sum_c = std::accumulate(up.counts.begin(), up.counts.end(), std::int64_t{0});
    }
    std::int64_t sum_u = 0;
    if (sum_c != 0 && need != 0) {
      for (std::int64_t cj : up.counts) {
        // t / torch.sum(counts).item(): int64 tensor / int -> float32; budget_size * t in float32; int().
        const float t = static_cast<float>(cj) / static_cast<float>(sum_c);
        const float prod = static_cast<float>(out.bmax) * t;
        up.scaled.push_back(static_cast<std::int64_t>(static_cast<double>(prod)));
        sum_u += up.scaled.back();
      }
      up.rho = static_cast<double>(sum_u) / static_cast<double>(need);
    }
    if (sum_c == 0 || need == 0 || up.rho == 0.0) {
      // The code divides by zero here; reconstructed guard: every layer so far gets b.
      up.fallback = true;
      up.budgets.assign(static_cast<std::size_t>(n), b);
    } else {
      for (std::int64_t u : up.scaled)
        up.budgets.push_back(static_cast<std::int64_t>(python_floordiv(static_cast<double>(u), up.rho)));
      const std::int64_t sum_b = std::accumulate(up.budgets.begin(), up.budgets.end(), std::int64_t{0});
      if (sum_b != need) up.budgets.back() += need - sum_b;
    }
    for (int j = 0; j < n; ++j) {
      auto& lay = out.layout[static_cast<std::size_t>(j)];
      const auto len = static_cast<std::int64_t>(lay.size());
      std::int64_t fix = std::min(up.budgets[static_cast<std::size_t>(j)], Lp);  // if fix_length > Lp: Lp
      std::int64_t end = 0;
      if (c.mode == DynamicKVMode::kBitFaithful) {
        end = fix >= 0 ? std::min(fix, len) : std::max<std::int64_t>(0, len + fix);  // Python slice [:fix]
      } else {
        end = std::clamp<std::int64_t>(fix, 0, len - w);  // never more than the layer still holds
        fix = end;
      }
      up.clipped.push_back(fix);
      std::vector<DynamicKVEntry> next(lay.begin(), lay.begin() + end);
      next.insert(next.end(), lay.end() - std::min(w, len), lay.end());  // k_cache[:, :, -window_size:]
      lay = std::move(next);
    }
    out.updates.push_back(std::move(up));
  }
  for (const auto& lay : out.layout) {
    const auto ranks = std::count_if(lay.begin(), lay.end(), [](DynamicKVEntry e) { return e >= 0; });
    out.prefix.push_back(ranks);
    out.duplicates.push_back(static_cast<std::int64_t>(lay.size()) - ranks - w);
  }
  return out;
}

}  // namespace

DynamicKVSchedule dynamickv_schedule(const std::vector<std::vector<VecX>>& scores, const DynamicKVScheduleConfig& c,
                                     const ForEachIndex& for_each_layer) {
  check_schedule_input(scores.size(), c);
  const auto H = static_cast<std::int64_t>(scores.front().size());
  const std::int64_t Lp = H > 0 ? scores.front().front().size() : 0;
  for (const auto& layer : scores) {
    if (static_cast<std::int64_t>(layer.size()) != H)
      throw Error(ErrorKind::kUsage, "dynamickv: every layer needs scores for the same number of heads");
    for (const VecX& h : layer)
      if (h.size() != Lp) throw Error(ErrorKind::kUsage, "dynamickv: every head needs Lp scores");
  }
  std::vector<std::vector<double>> flat(scores.size());  // each layer's heads end to end
  std::vector<std::span<const double>> layers;
  for (std::size_t l = 0; l < scores.size(); ++l) {
    for (const VecX& h : scores[l]) flat[l].insert(flat[l].end(), h.data(), h.data() + h.size());
    layers.emplace_back(flat[l]);
  }
  return schedule(H, Lp, c, std::move(layers), for_each_layer);
}

DynamicKVSchedule dynamickv_schedule(const std::vector<DynamicKVFlatScores>& scores, const DynamicKVScheduleConfig& c,
                                     const ForEachIndex& for_each_layer) {
  check_schedule_input(scores.size(), c);
  const std::int64_t H = scores.front().heads;
  const std::int64_t Lp = H > 0 ? static_cast<std::int64_t>(scores.front().values.size()) / H : 0;
  for (const auto& layer : scores) {
    if (layer.heads != H)
      throw Error(ErrorKind::kUsage, "dynamickv: every layer needs scores for the same number of heads");
    if (static_cast<std::int64_t>(layer.values.size()) != H * Lp)
      throw Error(ErrorKind::kUsage, "dynamickv: every head needs Lp scores");
  }
  std::vector<std::span<const float>> layers;
  for (const auto& layer : scores) layers.emplace_back(layer.values);
  return schedule(H, Lp, c, std::move(layers), for_each_layer);
}

std::vector<VecX> dynamickv_layer_scores(const LayerInput& in, std::int64_t window, std::int64_t kernel, Pool pool) {
  const std::int64_t T = in.tokens(), w = std::min(window, T), Lp = T - w;
  const int hq = static_cast<int>(in.q.size()), hkv = static_cast<int>(in.k.size());
  std::vector<VecX> out;
  for (int h = 0; h < hq; ++h) {
    const MatX& K = in.k[static_cast<std::size_t>(kv_head_of(h, hq, hkv))];
    // attn_weights[:, :, -w:, :-w].sum(dim=-2), then avg/max_pool1d(kernel, padding kernel//2, stride 1).
    const VecX a = window_scores(in.q[static_cast<std::size_t>(h)], K, w, Reduce::kSum).head(Lp);
    out.push_back(pool1d(a, kernel, pool));
  }
  return out;
}

DynamicKVConfig dynamickv_config(const Params& p) {
  DynamicKVConfig c;
  c.window = p.integer("window", 1);
  c.r_max = p.real("r_max");
  if (c.r_max < 0) throw Error(ErrorKind::kUsage, "dynamickv: parameter 'r_max' must be >= 0");
  c.kernel = p.integer("kernel", 1);
  if (c.kernel % 2 == 0)
    throw Error(ErrorKind::kUsage, "dynamickv: parameter 'kernel' must be odd (torch pooling with padding "
                                   "kernel/2 keeps the length only then), got " + std::to_string(c.kernel));
  c.pool = p.choice("pooling", {"avg", "max"}) == "avg" ? Pool::kAvg : Pool::kMax;
  c.interval = p.integer("interval", 1);
  c.mode = p.choice("mode", {"bit-faithful", "intended"}) == "bit-faithful" ? DynamicKVMode::kBitFaithful
                                                                             : DynamicKVMode::kIntended;
  c.group = p.choice("gqa", {"mean", "max"}) == "mean" ? Reduce::kMean : Reduce::kMax;
  return c;
}

std::int64_t DynamicKVConfig::effective_window(std::int64_t T) const { return std::min(window, T); }

DynamicKVScheduleConfig dynamickv_schedule_config(const DynamicKVConfig& p, int layers, std::int64_t T,
                                                  std::int64_t budget) {
  const std::int64_t w = p.effective_window(T);
  if (budget < w)
    throw Error(ErrorKind::kImpossibleBudget,
                "dynamickv: budget " + std::to_string(budget) + " is smaller than the observation window " +
                    std::to_string(w) + " (window " + std::to_string(p.window) + ", " + std::to_string(T) +
                    " prompt tokens): base = budget - window would be negative");
  DynamicKVScheduleConfig c;
  c.layers = layers;
  c.window = w;
  c.base = budget - w;
  c.r_max = p.r_max;
  c.interval = p.interval;
  c.mode = p.mode;
  return c;
}

namespace {

using Pass = DynamicKVPass<std::vector<VecX>>;

// The first pass over the reference's double scores.
class DynamicKVCoupling final : public LayerCoupling {
 public:
  DynamicKVCoupling(const DynamicKVConfig& p, const TraceMeta& meta, std::int64_t budget)
      : p_(p), pass_(p, meta.layers, budget, "dynamickv") {}

  void observe(const LayerInput& in) override {
    pass_.add_layer(in.layer, in.tokens(), dynamickv_layer_scores(in, p_.window, p_.kernel, p_.pool));
  }
  const Pass& pass() const { return pass_; }

 private:
  DynamicKVConfig p_;
  Pass pass_;
};

class DynamicKV final : public Method {
 public:
  DynamicKV(std::string preset, const Params& p)
      : preset_(std::move(preset)), params_(p.all()), p_(dynamickv_config(p)) {}

  std::string name() const override { return method_name("dynamickv", preset_, params_); }
  Laws laws() const override {
    return {BudgetLaw::kExact, BudgetLaw::kNone, ConservationLaw::kEviction, AllocationLaw::kPerLayer};
  }

  std::unique_ptr<LayerCoupling> coupling(const TraceMeta& meta, std::int64_t budget) const override {
    dynamickv_schedule_config(p_, meta.layers, meta.prompt_len, budget);  // fail before any data is read
    return std::make_unique<DynamicKVCoupling>(p_, meta, budget);
  }

  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    std::int64_t kept = 0;
    const LayerScores s = decide(in, budget, kept);
    const std::vector<std::int64_t> budgets(in.k.size(), kept);
    return LayerPlans::uniform(select_per_head(s, in.tokens(), budgets, name()), kept);
  }

  std::optional<LayerScores> decision_scores(const LayerInput& in, const LayerPlans&,
                                             std::int64_t budget) const override {
    std::int64_t kept = 0;
    return decide(in, budget, kept);
  }

  std::unique_ptr<DecodePolicy> decoder(const LayerInput&, const std::vector<std::int64_t>&) const override {
    return nullptr;  // prefill only: decoded tokens are appended
  }

  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t /*budget*/) const override {
    return index_range(n - std::min(p_.window, n), n);
  }

 private:
  /// This layer's decision: per kv head the group's mean/max of the pooled
  /// scores over the past tokens, the window protected, and `kept` = prefix[l]
  /// + w tokens per head from the schedule.
  LayerScores decide(const LayerInput& in, std::int64_t budget, std::int64_t& kept) const {
    const std::int64_t T = in.tokens(), w = p_.effective_window(T), Lp = T - w;
    const auto* cpl = dynamic_cast<const DynamicKVCoupling*>(in.coupling);
    const Pass::Layer layer =
        Pass::resolve(cpl ? &cpl->pass() : nullptr, p_, "dynamickv", in.layer, in.meta ? in.meta->layers : 1, T,
                      budget, [&] { return dynamickv_layer_scores(in, p_.window, p_.kernel, p_.pool); });
    kept = layer.prefix + w;
    const int hq = static_cast<int>(in.q.size()), hkv = static_cast<int>(in.k.size());
    LayerScores out;
    out.protected_tokens = index_range(Lp, T);
    for (int g = 0; g < hkv; ++g) {
      // The authors select per q head (repeat_kv); a kv-head plan takes the group's mean or max.
      VecX s = VecX::Zero(T);
      s.head(Lp) = group_reduce(*layer.scores, g, hq, hkv, p_.group);
      out.per_kv_head.push_back(std::move(s));
    }
    return out;
  }

  std::string preset_;
  std::map<std::string, std::string> params_;
  DynamicKVConfig p_;
};

}  // namespace

FamilyInfo dynamickv_family() {
  FamilyInfo f;
  f.family = "dynamickv";
  f.kind = "evict";
  f.when = "prefill";
  f.summary = "Layer-adaptive SnapKV-style eviction: budgets re-allocated across layers every `interval` layers "
              "from a global top-k of pooled window scores (sum over layers = the nominal budget).";
  f.params = {
      {"window", "8", "observation window w (window_size): kept in every layer, counts in the budget (integer >= 1)"},
      {"r_max", "10", "radio_max: a layer holds at most floor(r_max (budget - w)) past tokens (real >= 0)"},
      {"kernel", "7", "pooling kernel (odd integer >= 1)"},
      {"pooling", "avg", "avg (avg_pool1d, zero padding counted) | max (max_pool1d)"},
      {"interval", "4", "re-allocate after every `interval` layers (hard-coded layer_idx % 4 == 3 in the code)"},
      {"mode", "bit-faithful",
       "bit-faithful: the official slicing, including window tokens duplicated when an update gives a layer more "
       "than it holds (a plan keeps each token once; the count is in the schedule) | intended: an update never "
       "gives a layer more than it holds (<= Bmax)"},
      {"gqa", "mean", "mean | max of the q heads' pooled scores per kv head (the code selects per q head after "
                      "repeat_kv, which per-kv-head plans cannot represent; budgets use every q head as the code)"},
  };
  f.presets = {
      {"paper",
       {{"window", "8"}, {"r_max", "10"}, {"kernel", "7"}, {"pooling", "avg"}, {"interval", "4"},
        {"mode", "bit-faithful"}},
       "DreamMr/DynamicKV run/longbench/scripts (window_size 8, radio_max 10, avgpool kernel 7; Llama-3/InternLM) "
       "with dynamic_v11.py DynamicKVClusterV11"},
      {"pred",
       {{"window", "16"}, {"r_max", "5"}, {"kernel", "7"}, {"pooling", "avg"}, {"interval", "4"},
        {"mode", "bit-faithful"}},
       "DreamMr/DynamicKV run/longbench/pred.py defaults (window_size 16, radio_max 5.0, kernel 7, avgpool)"},
  };
  f.make = [](const std::string& preset, const Params& p) { return std::make_unique<DynamicKV>(preset, p); };
  return f;
}

}  // namespace kvscope::ref
