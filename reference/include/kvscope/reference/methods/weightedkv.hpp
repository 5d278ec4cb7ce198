// WeightedKV (Yuan, He, Bai, Leng, Jiang, arXiv 2503.01330, ICASSP 2025):
// a fixed-size cache maintained while streaming. Every slot carries the
// attention it received, summed (S) and counted (n); while the cache exceeds
// the budget, the unprotected slot with the lowest average a = S / n loses its
// key and its value is merged into a neighbouring slot's value by the convex
// combination weighted by the two averages. Keys are never modified. The update
// rule is a reconstruction (research notes 4.4): docs/algorithms/weightedkv.md.
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scores.hpp"

namespace kvscope::ref {

FamilyInfo weightedkv_family();

/// Resolved WeightedKV switches (the family's parameters).
struct WeightedKVConfig {
  bool merge_next = true;        // neighbour: next slot (else previous); the other side when unavailable
  bool add_score = false;        // on merge: S_m += S_e (else S_m kept)
  std::int64_t sinks = 0;        // first tokens never dropped nor merged into
  std::int64_t recent = 1;       // newest slots never dropped
  Reduce gqa = Reduce::kMean;    // a step's probabilities of a group's q heads -> the kv head
  bool streaming_prefill = true; // prompt token by token (else one shot from accumulated attention)

  /// Error(kImpossibleBudget) unless B >= sinks + max(recent, 1).
  void check_budget(std::int64_t budget) const;
};

/// One cache slot of the drop-and-merge loop, over some index space of
/// "inputs" (original tokens at prefill, current slots at decode).
struct WeightedSlot {
  std::int64_t key = 0;     // input whose key the slot holds
  std::int64_t token = 0;   // original token of that key (sinks test)
  std::vector<std::pair<std::int64_t, double>> value;  // (input, coefficient), increasing input
  double S = 0, n = 0;      // attention sum and observations
  std::int64_t position = 0, count = 1;
  double average() const { return n > 0 ? S / n : 0.0; }
};

/// One merge decision, for tests.
struct WeightedMerge {
  std::int64_t victim_token = 0, into_token = 0;
  double lambda = 0;  // the victim value's weight
};

/// The family's parameters resolved (Error(kUsage) on bad values).
WeightedKVConfig weightedkv_config(const Params& p);

/// Drops and merges while slots.size() > budget (research notes 4.4's loop).
/// Appends every decision to `log` when given. `min_margin` (nullable) is
/// lowered to the relative margin of every victim choice (runner-up average
/// minus the lowest, over the candidates' largest |average|; 0 when both
/// averages of a merge are below 1e-30, where fp32 cannot resolve the weight).
void weightedkv_compress(std::vector<WeightedSlot>& slots, std::int64_t budget, const WeightedKVConfig& c,
                         std::vector<WeightedMerge>* log = nullptr, double* min_margin = nullptr);

/// Group-reduced attention of prompt token i's queries over the key of every
/// current slot: out.size() == slots.size() on return.
using WeightedAttend =
    std::function<void(std::int64_t i, const std::vector<WeightedSlot>& slots, std::vector<double>& out)>;

/// The streaming prefill of one kv head, shared by every backend: token i
/// joins the cache, `attend` gives its attention over the slots' keys, S and n
/// update, then the cache is compressed back to `budget`.
std::vector<WeightedSlot> weightedkv_stream(std::int64_t tokens, std::int64_t budget, const WeightedKVConfig& c,
                                            const WeightedAttend& attend, double* min_margin = nullptr);

/// The one-shot prefill: slot j starts with S = sums[j] and n = T - j, then compressed.
std::vector<WeightedSlot> weightedkv_oneshot(const VecX& sums, std::int64_t budget, const WeightedKVConfig& c,
                                             double* min_margin = nullptr);

/// The plan of `slots` over `inputs` inputs (key coefficient 1 on the key, 0 elsewhere).
Plan weightedkv_plan(const std::vector<WeightedSlot>& slots, std::int64_t inputs);

/// Prefill of kv head `kv`: the slots left after compressing the prompt to `budget`.
std::vector<WeightedSlot> weightedkv_prefill_slots(const LayerInput& in, int kv, std::int64_t budget,
                                                   const WeightedKVConfig& c, double* min_margin = nullptr);

/// The decode policy: per kv head, S and n per original token; after every
/// step's attention, drop-and-merge down to the head budget.
class WeightedKVDecoder final : public DecodePolicy {
 public:
  WeightedKVDecoder(const LayerInput& in, std::vector<std::int64_t> head_budgets, const WeightedKVConfig& c);
  StepPlans before_attend(const DecodeStep& step) override;
  StepPlans after_attend(const DecodeStep& step, const std::vector<VecX>& probs) override;

  /// Attention sum and observation count of the slot holding `token`'s key in kv head `kv`.
  std::pair<double, double> state(int kv, std::int64_t token) const;
  /// Each kv head's merges of the last step.
  const std::vector<std::vector<WeightedMerge>>& last_merges() const { return merges_; }

 private:
  std::vector<std::int64_t> budgets_;
  WeightedKVConfig c_;
  int q_heads_, kv_heads_;
  std::vector<std::vector<double>> S_, n_;  // [kv head][original token]
  std::vector<std::vector<WeightedMerge>> merges_;
};

}  // namespace kvscope::ref
