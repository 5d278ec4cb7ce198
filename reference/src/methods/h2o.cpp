#include "kvscope/reference/methods/h2o.hpp"

#include <algorithm>
#include <cmath>

#include "kvscope/core/error.hpp"

namespace kvscope::ref {

std::int64_t H2OConfig::recent(std::int64_t budget) const {
  // The epsilon keeps e.g. 0.3 * 10 = 2.9999... from flooring to 2.
  const std::int64_t r = recent_is_ratio ? static_cast<std::int64_t>(std::floor(recent_ratio * static_cast<double>(budget) + 1e-9))
                                         : recent_tokens;
  if (r > budget)
    throw Error(ErrorKind::kImpossibleBudget, "h2o: budget " + std::to_string(budget) +
                                                  " cannot hold the recent window of " + std::to_string(r) + " tokens");
  return r;
}

VecX h2o_slot_scores(const std::vector<VecX>& acc, std::span<const std::int64_t> token, std::int64_t n,
                     const H2OConfig& c) {
  // Reduce after accumulating (kvpress: mean over the group of per-head
  // scores); for max this differs from accumulating per-step maxima.
  VecX s = group_reduce(acc, 0, static_cast<int>(acc.size()), 1, c.gqa);
  if (c.per_query)  // ObservedAttentionPress: divide column j by the n - j queries that saw it
    for (Eigen::Index i = 0; i < s.size(); ++i) s[i] /= static_cast<double>(n - token[static_cast<std::size_t>(i)]);
  return s;
}

Selection h2o_keep(const VecX& scores, std::int64_t m, std::int64_t budget, std::int64_t recent) {
  if (m <= budget) return Selection{index_range(0, m), std::numeric_limits<double>::infinity(), 0};
  // H2OKVCache_LayerWise: keep the last `recent` slots, top-`heavy` of [0, m - recent).
  const std::vector<std::int64_t> candidates = index_range(0, m - recent);
  Selection sel = top_k(scores, candidates, budget - recent);
  sel.kept = merge_sorted(sel.kept, index_range(m - recent, m));
  return sel;
}

H2ODecoder::H2ODecoder(const LayerInput& in, std::vector<std::int64_t> head_budgets, const H2OConfig& c)
    : budgets_(std::move(head_budgets)),
      c_(c),
      q_heads_(static_cast<int>(in.q.size())),
      kv_heads_(static_cast<int>(in.k.size())),
      selections_(budgets_.size()) {
  // The prompt's accumulated attention; prefill chose with exactly these sums.
  for (int h = 0; h < q_heads_; ++h) acc_.push_back(accumulated_attention(in, h, false));
}

StepPlans H2ODecoder::before_attend(const DecodeStep& step) { return StepPlans(step.heads->size()); }

StepPlans H2ODecoder::after_attend(const DecodeStep& step, const std::vector<VecX>& probs) {
  const auto& heads = *step.heads;
  const std::int64_t n = step.token + 1;
  // Accumulate: hh_score += attn column sums; the new token enters with its own column.
  for (int h = 0; h < q_heads_; ++h) {
    VecX& a = acc_[static_cast<std::size_t>(h)];
    if (a.size() < n) a.conservativeResizeLike(VecX::Zero(n));
    const Plan& p = heads[static_cast<std::size_t>(kv_head_of(h, q_heads_, kv_heads_))].plan;
    const VecX& pr = probs[static_cast<std::size_t>(h)];
    if (pr.size() != p.slots())
      throw Error(ErrorKind::kInternal, "h2o: q head " + std::to_string(h) + " got " + std::to_string(pr.size()) +
                                            " probabilities for " + std::to_string(p.slots()) + " slots");
    for (std::int64_t i = 0; i < p.slots(); ++i) a[p.token[static_cast<std::size_t>(p.row_begin(i))]] += pr[i];
  }
  // Evict after attending, as the authors' code (the query saw budget + 1 slots).
  StepPlans out(heads.size());
  const int g = q_heads_ / kv_heads_;
  for (std::size_t kv = 0; kv < heads.size(); ++kv) {
    const Plan& p = heads[kv].plan;
    const std::int64_t m = p.slots(), budget = budgets_[kv];
    if (m <= budget) continue;
    std::vector<std::int64_t> token(static_cast<std::size_t>(m));
    for (std::int64_t i = 0; i < m; ++i) token[static_cast<std::size_t>(i)] = p.token[static_cast<std::size_t>(p.row_begin(i))];
    std::vector<VecX> group(static_cast<std::size_t>(g), VecX(m));
    for (int q = 0; q < g; ++q)
      for (std::int64_t i = 0; i < m; ++i)
        group[static_cast<std::size_t>(q)][i] = acc_[kv * static_cast<std::size_t>(g) + static_cast<std::size_t>(q)][token[static_cast<std::size_t>(i)]];
    Selection sel = h2o_keep(h2o_slot_scores(group, token, n, c_), m, budget, c_.recent(budget));
    out[kv] = Plan::keep(m, sel.kept);  // survivors only: evicted tokens' sums are never read again
    selections_[kv] = std::move(sel);
  }
  return out;
}

double H2ODecoder::accumulated(int q_head, std::int64_t token) const {
  const VecX& a = acc_[static_cast<std::size_t>(q_head)];
  return token < a.size() ? a[token] : 0.0;
}

namespace {

// One-shot prefill: score every prompt token, protect the recent band.
class H2OScorer final : public Scorer {
 public:
  explicit H2OScorer(const H2OConfig& c) : c_(c) {}
  LayerScores score(const LayerInput& in, std::int64_t budget) const override {
    const std::int64_t T = in.tokens();
    const int q_heads = static_cast<int>(in.q.size()), kv_heads = static_cast<int>(in.k.size());
    const int g = q_heads / kv_heads;
    const std::vector<std::int64_t> tokens = index_range(0, T);
    LayerScores out;
    for (int kv = 0; kv < kv_heads; ++kv) {
      std::vector<VecX> group;
      for (int q = kv * g; q < (kv + 1) * g; ++q) group.push_back(accumulated_attention(in, q, false));
      out.per_kv_head.push_back(h2o_slot_scores(group, tokens, T, c_));
    }
    out.protected_tokens = index_range(std::max<std::int64_t>(0, T - c_.recent(budget)), T);
    return out;
  }

 private:
  H2OConfig c_;
};

}  // namespace

H2OConfig h2o_config(const Params& p) {
  H2OConfig c;
  c.per_query = p.choice("score", {"sum", "per-query"}) == "per-query";
  const std::string& r = p.text("recent");
  c.recent_is_ratio = r.find('.') != std::string::npos;
  if (c.recent_is_ratio) {
    c.recent_ratio = p.real("recent");
    if (c.recent_ratio < 0 || c.recent_ratio > 1)
      throw Error(ErrorKind::kUsage, "h2o: parameter 'recent' as a ratio must lie in [0, 1], got " + r);
  } else {
    c.recent_tokens = p.integer("recent", 0);
  }
  c.gqa = parse_reduce(p.text("gqa"), "h2o: gqa");
  c.evict_in_decode = p.choice("decode", {"evict", "grow"}) == "evict";
  return c;
}

namespace {

class H2O final : public Method {
 public:
  H2O(std::string preset, const Params& p)
      : preset_(std::move(preset)), params_(p.all()), c_(h2o_config(p)), scorer_(c_) {}

  std::string name() const override { return method_name("h2o", preset_, params_); }
  // After every decode step the cache holds min(B, n) slots exactly.
  Laws laws() const override {
    return {BudgetLaw::kExact, c_.evict_in_decode ? BudgetLaw::kExact : BudgetLaw::kNone, ConservationLaw::kEviction};
  }

  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    const std::vector<std::int64_t> budgets(in.k.size(), budget);
    return LayerPlans::uniform(select_per_head(scorer_.score(in, budget), in.tokens(), budgets, name()), budget);
  }

  std::unique_ptr<DecodePolicy> decoder(const LayerInput& in, const std::vector<std::int64_t>& budgets) const override {
    if (!c_.evict_in_decode || budgets.empty()) return nullptr;
    return std::make_unique<H2ODecoder>(in, budgets, c_);
  }

  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t budget) const override {
    return index_range(std::max<std::int64_t>(0, n - c_.recent(budget)), n);
  }

  const Scorer* scorer() const override { return &scorer_; }

 private:
  std::string preset_;
  std::map<std::string, std::string> params_;
  H2OConfig c_;
  H2OScorer scorer_;
};

}  // namespace

FamilyInfo h2o_family() {
  FamilyInfo f;
  f.family = "h2o";
  f.kind = "evict";
  f.when = "prefill + decode";
  f.summary = "Keep the recent band plus the tokens with the most accumulated attention (heavy hitters).";
  f.params = {
      {"score", "sum",
       "sum: accumulated attention sum_t A[t,j] (H2O, KVCache-Factory); per-query: divided by the n - j queries "
       "that saw token j (kvpress ObservedAttentionPress)"},
      {"recent", "0.5",
       "protected most recent tokens: an integer count, or a ratio of the budget written with a point (0.5 = "
       "floor(B/2)); the rest of the budget holds heavy hitters"},
      {"gqa", "mean", "how the q heads of a group reduce to their kv head's score: mean, max or sum (the original "
                      "code scores per q head, consistent only for MHA)"},
      {"decode", "evict", "evict: H2O eviction after every decode step with the accumulated scores (cache = B); "
                          "grow: compress the prompt only"},
  };
  f.presets = {
      {"paper", {{"score", "sum"}, {"recent", "0.5"}, {"gqa", "mean"}, {"decode", "evict"}},
       "FMInference/H2O H2OKVCache_LayerWise (h2o_hf/utils_real_drop/modify_llama.py): heavy = recent = B/2, "
       "accumulated sums, evict after every forward"},
      {"kvcache-factory", {{"score", "sum"}, {"recent", "32"}, {"gqa", "mean"}, {"decode", "grow"}},
       "KVCache-Factory H2OKVCluster after the causal-mask fix 9f9aa2e: sum over all causal rows, last 32 "
       "(window) protected, prompt only; --gqa_score_agg mean"},
      {"kvpress", {{"score", "per-query"}, {"recent", "0"}, {"gqa", "mean"}, {"decode", "grow"}},
       "NVIDIA kvpress ObservedAttentionPress: per-query normalised scores, mean over the group, no recent "
       "protection, prompt only"},
  };
  f.make = [](const std::string& preset, const Params& p) { return std::make_unique<H2O>(preset, p); };
  return f;
}

}  // namespace kvscope::ref
