#include "kvscope/reference/methods/knorm.hpp"

#include <algorithm>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/scorer.hpp"

namespace kvscope::ref {

VecX knorm_scores(const MatX& K) { return -K.rowwise().norm(); }

namespace {

// Sinks and window are protected (none in kvpress KnormPress or KVCF
// L2NormCluster; the knobs exist to compare with window-protecting methods).
std::vector<std::int64_t> knorm_protected(std::int64_t n, std::int64_t sinks, std::int64_t window) {
  return merge_sorted(index_range(0, std::min(sinks, n)), index_range(std::max<std::int64_t>(0, n - window), n));
}

class KNormScorer final : public Scorer {
 public:
  KNormScorer(std::int64_t sinks, std::int64_t window) : sinks_(sinks), window_(window) {}
  LayerScores score(const LayerInput& in, std::int64_t) const override {
    LayerScores s;
    for (const MatX& K : in.k) s.per_kv_head.push_back(knorm_scores(K));  // per kv head: no GQA reduction
    s.protected_tokens = knorm_protected(in.tokens(), sinks_, window_);
    return s;
  }

 private:
  std::int64_t sinks_, window_;
};

class KNorm final : public Method {
 public:
  KNorm(std::string preset, const Params& p)
      : preset_(std::move(preset)),
        params_(p.all()),
        sinks_(p.integer("sinks", 0)),
        window_(p.integer("window", 0)),
        skip_layers_(p.integer("skip_layers", 0)),
        scorer_(sinks_, window_) {}

  std::string name() const override { return method_name("knorm", preset_, params_); }

  // Skipped layers declare the whole prompt as their budget, so the exact law
  // still holds for them; the per-layer allocation law admits that.
  Laws laws() const override {
    return {BudgetLaw::kExact, BudgetLaw::kNone, ConservationLaw::kEviction,
            skip_layers_ > 0 ? AllocationLaw::kPerLayer : AllocationLaw::kUniform};
  }

  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    const std::int64_t n = in.tokens();
    const std::size_t heads = in.k.size();
    if (in.layer < skip_layers_) return LayerPlans::uniform(std::vector<Plan>(heads, Plan::identity(n)), n);
    protected_tokens(n, budget);  // names an impossible budget
    const std::vector<std::int64_t> budgets(heads, budget);
    return LayerPlans{select_per_head(scorer_.score(in, budget), n, budgets, name()), budgets};
  }

  std::unique_ptr<DecodePolicy> decoder(const LayerInput&, const std::vector<std::int64_t>&) const override {
    return nullptr;  // prefill only: decoded tokens are all kept (kvpress, KVCF)
  }

  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t budget) const override {
    std::vector<std::int64_t> prot = knorm_protected(n, sinks_, window_);
    if (budget < n && budget < static_cast<std::int64_t>(prot.size()))
      throw Error(ErrorKind::kImpossibleBudget, "knorm: budget " + std::to_string(budget) + " cannot hold sinks " +
                                                    std::to_string(sinks_) + " + window " + std::to_string(window_));
    return prot;
  }

  const Scorer* scorer() const override { return &scorer_; }

 private:
  std::string preset_;
  std::map<std::string, std::string> params_;
  std::int64_t sinks_, window_, skip_layers_;
  KNormScorer scorer_;
};

}  // namespace

FamilyInfo knorm_family() {
  FamilyInfo f;
  f.family = "knorm";
  f.kind = "evict";
  f.when = "prefill";
  f.summary = "Keep the prompt keys with the lowest L2 norm per kv head (score -||k_j||).";
  f.params = {
      {"sinks", "0", "first tokens always kept (counted in the budget): integer >= 0"},
      {"window", "0", "last prompt tokens always kept (counted in the budget): integer >= 0"},
      {"skip_layers", "0", "leave the first N layers uncompressed (their budget is the whole prompt): integer >= 0"},
  };
  f.presets = {
      {"kvpress", {{"sinks", "0"}, {"window", "0"}, {"skip_layers", "0"}},
       "NVIDIA kvpress KnormPress (presses/knorm_press.py, scorers/knorm_scorer.py): every layer, no protection"},
      {"kvcache-factory", {{"sinks", "0"}, {"window", "0"}, {"skip_layers", "0"}},
       "KVCache-Factory L2NormCluster (pyramidkv_utils.py): no window, skip_layers list (default empty; "
       "set skip_layers=N to leave the first N layers whole, as the paper suggests)"},
  };
  f.make = [](const std::string& preset, const Params& p) { return std::make_unique<KNorm>(preset, p); };
  return f;
}

}  // namespace kvscope::ref
