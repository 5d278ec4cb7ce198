#include "kvscope/reference/methods/tova.hpp"

#include <algorithm>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/scorer.hpp"

namespace kvscope::ref {

VecX tova_scores(const LayerInput& in) {
  const std::int64_t T = in.tokens();
  const int q_heads = static_cast<int>(in.q.size()), kv_heads = static_cast<int>(in.k.size());
  VecX s = VecX::Zero(T);
  if (T == 0) return s;
  // TOVACache.reduce: attn_weights[:, :, -1, :].mean(heads), the last row only.
  for (int h = 0; h < q_heads; ++h)
    s += window_attention(in.q[static_cast<std::size_t>(h)], in.k[static_cast<std::size_t>(kv_head_of(h, q_heads, kv_heads))], 1)
             .row(0)
             .transpose();
  return s / static_cast<double>(q_heads);
}

VecX tova_step_scores(const std::vector<HeadCache>& heads, const std::vector<VecX>& probs, std::int64_t n) {
  const int q_heads = static_cast<int>(probs.size()), kv_heads = static_cast<int>(heads.size());
  VecX s = VecX::Zero(n);
  for (int h = 0; h < q_heads; ++h) {
    const Plan& p = heads[static_cast<std::size_t>(kv_head_of(h, q_heads, kv_heads))].plan;
    const VecX& pr = probs[static_cast<std::size_t>(h)];
    if (pr.size() != p.slots())
      throw Error(ErrorKind::kInternal, "tova: q head " + std::to_string(h) + " got " + std::to_string(pr.size()) +
                                            " probabilities for " + std::to_string(p.slots()) + " slots");
    for (std::int64_t i = 0; i < p.slots(); ++i) s[p.token[static_cast<std::size_t>(p.row_begin(i))]] += pr[i];
  }
  return s / static_cast<double>(q_heads);
}

std::vector<std::int64_t> tova_protected(std::int64_t n, std::int64_t budget, bool keep_last) {
  if (!keep_last || n == 0) return {};
  if (budget < 1)
    throw Error(ErrorKind::kImpossibleBudget, "tova: budget " + std::to_string(budget) +
                                                  " cannot hold the last token that keep_last=true protects");
  return {n - 1};
}

namespace {

class TovaScorer final : public Scorer {
 public:
  explicit TovaScorer(bool keep_last) : keep_last_(keep_last) {}
  LayerScores score(const LayerInput& in, std::int64_t budget) const override {
    const VecX s = tova_scores(in);  // layer-wise: one vector for every kv head
    return {std::vector<VecX>(in.k.size(), s), tova_protected(in.tokens(), budget, keep_last_)};
  }

 private:
  bool keep_last_;
};

// Reduce after every step: the query attended over B + 1 slots, then the
// lowest-scoring token goes (TOVACache.reduce runs inside the forward).
class TovaDecoder final : public DecodePolicy {
 public:
  TovaDecoder(std::vector<std::int64_t> budgets, bool keep_last) : budgets_(std::move(budgets)), keep_last_(keep_last) {}
  StepPlans before_attend(const DecodeStep& step) override { return StepPlans(step.heads->size()); }
  StepPlans after_attend(const DecodeStep& step, const std::vector<VecX>& probs) override {
    const auto& heads = *step.heads;
    const std::int64_t n = step.token + 1;
    const VecX s = tova_step_scores(heads, probs, n);
    StepPlans out(heads.size());
    for (std::size_t kv = 0; kv < heads.size(); ++kv) {
      const Plan& p = heads[kv].plan;
      const std::int64_t m = p.slots(), budget = budgets_[kv];
      if (m <= budget) continue;
      VecX slot_scores(m);
      for (std::int64_t i = 0; i < m; ++i) slot_scores[i] = s[p.token[static_cast<std::size_t>(p.row_begin(i))]];
      // The appended token is the last slot; it competes unless keep_last.
      const std::int64_t prot = keep_last_ && budget >= 1 ? 1 : 0;
      const Selection sel = top_k(slot_scores, index_range(0, m - prot), budget - prot);
      out[kv] = Plan::keep(m, merge_sorted(sel.kept, index_range(m - prot, m)));
    }
    return out;
  }

 private:
  std::vector<std::int64_t> budgets_;
  bool keep_last_;
};

class Tova final : public Method {
 public:
  Tova(std::string preset, const Params& p)
      : preset_(std::move(preset)),
        params_(p.all()),
        keep_last_(p.boolean("keep_last")),
        evict_in_decode_(p.choice("decode", {"evict", "grow"}) == "evict"),
        scorer_(keep_last_) {}

  std::string name() const override { return method_name("tova", preset_, params_); }
  // |cache| = min(B, n) after the prompt and after every reduce.
  Laws laws() const override {
    return {BudgetLaw::kExact, evict_in_decode_ ? BudgetLaw::kExact : BudgetLaw::kNone, ConservationLaw::kEviction};
  }

  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    const std::vector<std::int64_t> budgets(in.k.size(), budget);
    return LayerPlans::uniform(select_per_head(scorer_.score(in, budget), in.tokens(), budgets, name()), budget);
  }

  std::unique_ptr<DecodePolicy> decoder(const LayerInput&, const std::vector<std::int64_t>& budgets) const override {
    if (!evict_in_decode_ || budgets.empty()) return nullptr;
    return std::make_unique<TovaDecoder>(budgets, keep_last_);
  }

  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t budget) const override {
    return tova_protected(n, budget, keep_last_);
  }

  const Scorer* scorer() const override { return &scorer_; }

 private:
  std::string preset_;
  std::map<std::string, std::string> params_;
  bool keep_last_, evict_in_decode_;
  TovaScorer scorer_;
};

}  // namespace

FamilyInfo tova_family() {
  FamilyInfo f;
  f.family = "tova";
  f.kind = "evict";
  f.when = "prefill + decode";
  f.summary = "Keep the B tokens the last query attends to most, averaged over all heads (one set per layer).";
  f.params = {
      {"keep_last", "false", "true: the newest token is always kept (kvpress sentinel max+1); false: it competes "
                             "like any other (official TOVACache)"},
      {"decode", "evict", "evict: reduce to B after every decode step (cache = B); grow: compress the prompt only"},
  };
  f.presets = {
      {"paper", {{"keep_last", "false"}, {"decode", "evict"}},
       "schwartz-lab-NLP/TOVA src/tova_cache.py TOVACache.reduce: last-row attention averaged over all heads, "
       "top-B, after the prompt and every decode step"},
      {"kvpress", {{"keep_last", "true"}, {"decode", "grow"}},
       "NVIDIA kvpress TOVAPress: the same score, last token forced kept, prompt only (no DecodingPress)"},
  };
  f.make = [](const std::string& preset, const Params& p) { return std::make_unique<Tova>(preset, p); };
  return f;
}

}  // namespace kvscope::ref
