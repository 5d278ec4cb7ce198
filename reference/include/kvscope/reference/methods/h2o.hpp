// H2O, Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023): every cached token
// carries its accumulated attention (the column sum of the softmax rows that
// saw it); keep the `recent` newest tokens plus the `heavy` best-scoring older
// ones. One-shot at prefill (KVCache-Factory H2OKVCluster, kvpress
// ObservedAttentionPress) and, in the authors' H2OKVCache_LayerWise, again
// after every decode step with the score state carried along.
// docs/algorithms/h2o.md lists parameters, presets and sources.
#pragma once

#include <cstdint>
#include <vector>

#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scorer.hpp"
#include "kvscope/reference/scores.hpp"

namespace kvscope::ref {

FamilyInfo h2o_family();

/// Resolved H2O switches (the family's parameters).
struct H2OConfig {
  bool per_query = false;      // score = acc / (queries that saw the token), kvpress ObservedAttention
  bool recent_is_ratio = true;  // recent = floor(recent_ratio * B), else recent_tokens
  double recent_ratio = 0.5;
  std::int64_t recent_tokens = 0;
  Reduce gqa = Reduce::kMean;   // q heads of a group -> their kv head
  bool evict_in_decode = true;

  /// Recent tokens protected under budget B; Error(kImpossibleBudget) when > B.
  std::int64_t recent(std::int64_t budget) const;
};

/// Scores of a kv head's slots: the GQA reduction of per-q-head accumulated
/// attention, divided by the number of queries that saw each token when
/// per_query. `acc[g][i]` is q head g's (of the group) sum at slot i, `token[i]`
/// the slot's original index, `n` the tokens seen so far (queries that saw token
/// j: n - j, because evictions are final).
/// Reads and validates the h2o parameters.
H2OConfig h2o_config(const Params& p);

VecX h2o_slot_scores(const std::vector<VecX>& acc, std::span<const std::int64_t> token, std::int64_t n,
                     const H2OConfig& c);

/// The H2O keep rule over m slots in position order: the last `recent` slots
/// plus the top-(budget - recent) of the others by `scores` (top_k's tie rule).
/// m <= budget keeps everything.
Selection h2o_keep(const VecX& scores, std::int64_t m, std::int64_t budget, std::int64_t recent);

/// The decode policy: per q head, accumulated attention per original token,
/// updated in after_attend with the step's probabilities (the new token enters
/// with the attention it received), then eviction down to the head budget.
class H2ODecoder final : public DecodePolicy {
 public:
  H2ODecoder(const LayerInput& in, std::vector<std::int64_t> head_budgets, const H2OConfig& c);
  StepPlans before_attend(const DecodeStep& step) override;
  StepPlans after_attend(const DecodeStep& step, const std::vector<VecX>& probs) override;

  /// q head h's accumulated attention on original token j (for tests).
  double accumulated(int q_head, std::int64_t token) const;
  /// Each kv head's last eviction decision (empty before the first).
  const std::vector<Selection>& last_selections() const { return selections_; }

 private:
  std::vector<std::int64_t> budgets_;
  H2OConfig c_;
  int q_heads_, kv_heads_;
  std::vector<VecX> acc_;  // [q head] -> per original token, grown as tokens arrive
  std::vector<Selection> selections_;
};

}  // namespace kvscope::ref
