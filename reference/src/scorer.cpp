#include "kvscope/reference/scorer.hpp"

#include "kvscope/core/error.hpp"

namespace kvscope::ref {

std::optional<LayerScores> Method::decision_scores(const LayerInput& in, const LayerPlans&,
                                                  std::int64_t budget) const {
  if (const Scorer* s = scorer()) return s->score(in, budget);
  return std::nullopt;
}

std::vector<Plan> select_per_head(const LayerScores& scores, std::int64_t tokens,
                                  const std::vector<std::int64_t>& head_budgets, const std::string& method,
                                  std::vector<Selection>* selections) {
  const auto& prot = scores.protected_tokens;
  const std::vector<std::int64_t> candidates = complement(tokens, prot);

  std::vector<Plan> plans;
  for (std::size_t h = 0; h < scores.per_kv_head.size(); ++h) {
    const std::int64_t budget = head_budgets[h];
    const auto n_prot = static_cast<std::int64_t>(prot.size());
    if (budget < tokens && budget < n_prot)
      throw Error(ErrorKind::kImpossibleBudget, method + ": budget " + std::to_string(budget) + " of kv head " +
                                                    std::to_string(h) + " cannot hold its " + std::to_string(n_prot) +
                                                    " protected tokens");
    Selection sel = budget >= tokens ? Selection{candidates, std::numeric_limits<double>::infinity(), 0}
                                     : top_k(scores.per_kv_head[h], candidates, budget - n_prot);
    plans.push_back(Plan::keep(tokens, merge_sorted(sel.kept, prot)));
    if (selections) selections->push_back(std::move(sel));
  }
  return plans;
}

}  // namespace kvscope::ref
