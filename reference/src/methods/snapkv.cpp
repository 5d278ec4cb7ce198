#include "kvscope/reference/methods/snapkv.hpp"

#include <algorithm>

#include "kvscope/core/error.hpp"

namespace kvscope::ref {

std::vector<ParamDecl> snapkv_params() {
  return {
      {"window", "32", "observation window w: the last w prompt queries score the keys; the window is always kept "
                       "and counts in the budget (integer >= 0)"},
      {"kernel", "5", "pooling kernel (odd integer >= 1; 1 = no smoothing)"},
      {"pooling", "avg", "avg (torch avg_pool1d, zero padding counted) | max (max_pool1d) | none"},
      {"rows", "sum", "sum | mean of the window rows' attention (eq. 1 sums; kvpress and AdaKV average)"},
      {"gqa", "group-then-pool",
       "group-then-pool (KVCache-Factory kv_head: reduce over the q heads of a group, then pool) | pool-then-group "
       "(kvpress: pool per q head, then reduce). The original's per-q-head sets cannot be represented"},
      {"group_reduce", "mean", "mean | max | sum over the q heads of a GQA group"},
      {"small_budget", "error",
       "budget < window: error (impossible budget) | recent (keep the `budget` most recent tokens)"},
  };
}

SnapKVConfig snapkv_config(const Params& p, const std::string& family) {
  SnapKVConfig c;
  c.window = p.integer("window", 0);
  c.kernel = p.integer("kernel", 1);
  if (c.kernel % 2 == 0)
    throw Error(ErrorKind::kUsage, family + ": parameter 'kernel' must be odd (torch pooling with padding "
                                            "kernel/2 keeps the length only then), got " + std::to_string(c.kernel));
  c.pool = parse_pool(p.text("pooling"), "pooling");
  c.rows = parse_reduce(p.choice("rows", {"sum", "mean"}), "rows");
  if (p.text("gqa") == "query-head")
    throw Error(ErrorKind::kUsage, family + ": gqa=query-head (every q head its own kept set, a G-times larger "
                                            "cache) cannot be represented by per-kv-head plans; use "
                                            "group-then-pool or pool-then-group");
  c.gqa = p.choice("gqa", {"group-then-pool", "pool-then-group"}) == "group-then-pool" ? GqaMode::kGroupThenPool
                                                                                       : GqaMode::kPoolThenGroup;
  c.group = parse_reduce(p.text("group_reduce"), "group_reduce");
  c.small = p.choice("small_budget", {"error", "recent"}) == "error" ? SmallBudget::kError : SmallBudget::kRecent;
  return c;
}

std::vector<std::int64_t> snapkv_protected(std::int64_t n, std::int64_t budget, const SnapKVConfig& c,
                                           const std::string& family) {
  const std::int64_t w = std::min(c.window, n);
  if (budget >= w) return index_range(n - w, n);
  if (c.small == SmallBudget::kError || budget < 0)
    throw Error(ErrorKind::kImpossibleBudget,
                family + ": budget " + std::to_string(budget) + " is smaller than the observation window " +
                    std::to_string(w) + " (window " + std::to_string(c.window) + ", " + std::to_string(n) +
                    " tokens); lower 'window' or set small_budget=recent");
  return index_range(n - budget, n);
}

LayerScores snapkv_scores(const LayerInput& in, std::int64_t budget, const SnapKVConfig& c,
                          const std::string& family) {
  const std::int64_t T = in.tokens();
  const std::int64_t w = std::min(c.window, T), past = T - w;
  const int hq = static_cast<int>(in.q.size()), hkv = static_cast<int>(in.k.size());
  LayerScores out;
  out.protected_tokens = snapkv_protected(T, budget, c, family);
  // Eq. 1: C_j = sum (or mean) over the window rows of softmax(q_i k_j / sqrt d),
  // causal inside the window; only the past keys [0, T - w) are candidates and
  // pooling sees only them (the original pools attn[..., -w:, :-w]).
  std::vector<VecX> per_q(static_cast<std::size_t>(hq));
  for (int h = 0; h < hq; ++h) {
    const MatX& K = in.k[static_cast<std::size_t>(kv_head_of(h, hq, hkv))];
    per_q[static_cast<std::size_t>(h)] = window_scores(in.q[static_cast<std::size_t>(h)], K, w, c.rows).head(past);
  }
  if (c.gqa == GqaMode::kPoolThenGroup)
    for (VecX& s : per_q) s = pool1d(s, c.kernel, c.pool);
  for (int g = 0; g < hkv; ++g) {
    VecX s = group_reduce(per_q, g, hq, hkv, c.group);
    if (c.gqa == GqaMode::kGroupThenPool) s = pool1d(s, c.kernel, c.pool);
    VecX full = VecX::Zero(T);
    full.head(past) = s;
    out.per_kv_head.push_back(std::move(full));
  }
  return out;
}

namespace {

class SnapKV final : public Method {
 public:
  SnapKV(std::string preset, const Params& p) : preset_(std::move(preset)), params_(p.all()),
                                                scorer_(snapkv_config(p, "snapkv"), "snapkv") {}

  std::string name() const override { return method_name("snapkv", preset_, params_); }
  Laws laws() const override { return {BudgetLaw::kExact, BudgetLaw::kNone, ConservationLaw::kEviction}; }

  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    const LayerScores s = scorer_.score(in, budget);
    const std::vector<std::int64_t> budgets(in.k.size(), budget);
    return LayerPlans::uniform(select_per_head(s, in.tokens(), budgets, name()), budget);
  }

  // Prefill-only: decoded tokens are all kept (as the original and kvpress).
  std::unique_ptr<DecodePolicy> decoder(const LayerInput&, const std::vector<std::int64_t>&) const override {
    return nullptr;
  }

  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t budget) const override {
    return snapkv_protected(n, budget, scorer_.config(), "snapkv");
  }

  const Scorer* scorer() const override { return &scorer_; }

 private:
  std::string preset_;
  std::map<std::string, std::string> params_;
  SnapKVScorer scorer_;
};

}  // namespace

FamilyInfo snapkv_family() {
  FamilyInfo f;
  f.family = "snapkv";
  f.kind = "evict";
  f.when = "prefill";
  f.summary = "Keep the observation window plus the prompt keys its queries attend to most (pooled window scores).";
  f.params = snapkv_params();
  f.presets = {
      {"paper", {{"window", "32"}, {"kernel", "5"}, {"pooling", "avg"}, {"rows", "sum"}},
       "Li et al. 2024 and FasterDecoding/SnapKV snapkv_utils.py (init_snapkv: w 32, kernel 5, avgpool, sum); "
       "GQA as group-then-pool mean (the original repeats kv per q head)"},
      {"kvpress",
       {{"window", "64"}, {"kernel", "5"}, {"pooling", "avg"}, {"rows", "mean"}, {"gqa", "pool-then-group"},
        {"group_reduce", "mean"}, {"small_budget", "recent"}},
       "NVIDIA kvpress SnapKVPress (window_size 64, kernel 5, mean rows, avg_pool1d then mean over the group)"},
      {"kvcache-factory",
       {{"window", "32"}, {"kernel", "5"}, {"pooling", "avg"}, {"rows", "sum"}, {"gqa", "group-then-pool"},
        {"group_reduce", "mean"}},
       "KVCache-Factory SnapKVCluster defaults (w 32, kernel 5, avgpool, sum) in kv_head granularity, mean"},
      {"adakv",
       {{"window", "32"}, {"kernel", "7"}, {"pooling", "max"}, {"rows", "mean"}, {"gqa", "group-then-pool"},
        {"group_reduce", "mean"}},
       "the scorer of FFY0/AdaKV adaptive_snapkv snapkv_utils.py (w 32, maxpool kernel 7, mean rows, "
       "Ada-SnapKV-GQA mean)"},
  };
  f.make = [](const std::string& preset, const Params& p) { return std::make_unique<SnapKV>(preset, p); };
  return f;
}

}  // namespace kvscope::ref
