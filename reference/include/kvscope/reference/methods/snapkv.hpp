// SnapKV (Li et al., NeurIPS 2024, "SnapKV: LLM Knows What You are Looking
// for Before Generation"): score every prompt key by the attention the last w
// queries (the observation window) pay it, smooth the scores with a 1-D
// pooling, keep the window plus the top-(B - w) pooled keys per kv head.
// PyramidKV and AdaKV reuse the scorer. docs/algorithms/snapkv.md lists
// presets, sources and the reconstructed choices.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scorer.hpp"

namespace kvscope::ref {

/// How the q heads of a GQA group become one score per kv head.
enum class GqaMode {
  kGroupThenPool,  // KVCache-Factory kv_head mode: reduce the window scores over the group, then pool
  kPoolThenGroup,  // kvpress: pool each q head's scores, then reduce over the group
};

/// What a budget smaller than the observation window means.
enum class SmallBudget {
  kError,   // Error(kImpossibleBudget): the authors' topk(C - w) has no meaning for C < w
  kRecent,  // keep the `budget` most recent tokens (the window shrinks to the budget)
};

struct SnapKVConfig {
  std::int64_t window = 32;
  std::int64_t kernel = 5;
  Pool pool = Pool::kAvg;
  Reduce rows = Reduce::kSum;      // over the window rows (eq. 1 of the paper sums)
  GqaMode gqa = GqaMode::kGroupThenPool;
  Reduce group = Reduce::kMean;    // over the q heads of a group
  SmallBudget small = SmallBudget::kError;
};

/// SnapKV's parameters (shared by PyramidKV, which adds its schedule).
std::vector<ParamDecl> snapkv_params();
/// Reads and validates them; `family` names the method in errors.
SnapKVConfig snapkv_config(const Params& p, const std::string& family);

/// Protected tokens of an n-token cache at `budget`: the last min(w, n)
/// tokens, or under SmallBudget::kRecent with budget < min(w, n) the last
/// `budget` ones. kError with budget < min(w, n) throws kImpossibleBudget.
std::vector<std::int64_t> snapkv_protected(std::int64_t n, std::int64_t budget, const SnapKVConfig& c,
                                           const std::string& family);

/// SnapKV scores of one layer: per kv head, the pooled window scores of the
/// candidates [0, T - min(w, T)); protected entries are 0 (never read).
LayerScores snapkv_scores(const LayerInput& in, std::int64_t budget, const SnapKVConfig& c,
                          const std::string& family);

class SnapKVScorer final : public Scorer {
 public:
  SnapKVScorer(SnapKVConfig c, std::string family) : c_(c), family_(std::move(family)) {}
  LayerScores score(const LayerInput& in, std::int64_t budget) const override {
    return snapkv_scores(in, budget, c_, family_);
  }
  const SnapKVConfig& config() const { return c_; }

 private:
  SnapKVConfig c_;
  std::string family_;
};

FamilyInfo snapkv_family();

}  // namespace kvscope::ref
