// Score-then-top-k eviction, the shape most prefill baselines share (SnapKV,
// H2O one-shot, KNorm, PyramidKV): a Scorer gives every prompt token of every
// kv head a score and names the protected tokens; select_per_head keeps the
// protected tokens plus the best-scoring rest up to each head's budget.
// Head-adaptive allocation (AdaKV) wraps any Scorer.
#pragma once

#include <cstdint>
#include <vector>

#include "kvscope/reference/method.hpp"
#include "kvscope/reference/scores.hpp"

namespace kvscope::ref {

/// One layer's scores: higher = more worth keeping.
struct LayerScores {
  std::vector<VecX> per_kv_head;               // [kv head] -> T scores (protected entries are ignored)
  std::vector<std::int64_t> protected_tokens;  // ascending; kept in every head, counted in its budget
  /// Merge methods whose decisions chain (KVMerger: heavy set -> eligible edges
  /// -> merged edges -> pivots; WeightedKV: one victim per step): per kv head,
  /// the smallest relative margin of any decision prefill took (0 = an exact
  /// tie). Empty for score-then-top-k methods. docs/verification.md, "Merge plans".
  std::vector<double> head_margin{};
  /// Whether a flipped decision can leave a slot in place with other weights
  /// (WeightedKV: merge order changes the products of lambdas; KVMerger: no,
  /// a set's weights depend on the set alone).
  bool reweights_follow_decisions = false;
};

class Scorer {
 public:
  virtual ~Scorer() = default;
  /// Scores of a layer's T prompt tokens for a nominal per-head `budget`.
  virtual LayerScores score(const LayerInput& in, std::int64_t budget) const = 0;
};

/// Per kv head h: protected ∪ top-(head_budgets[h] - |protected|) of the other
/// tokens (top_k's tie rule). A head whose budget covers all T tokens keeps
/// everything. `selections`, when given, receives each head's Selection
/// (margins and ties). A budget smaller than the protected set is
/// Error(kImpossibleBudget) naming `method`.
std::vector<Plan> select_per_head(const LayerScores& scores, std::int64_t tokens,
                                  const std::vector<std::int64_t>& head_budgets, const std::string& method,
                                  std::vector<Selection>* selections = nullptr);

}  // namespace kvscope::ref
