// KVMerger (Wang, Jin, Yu, Zhang, arXiv 2407.08454, "Model Tells You Where to
// Merge"): per kv head, maximal runs of adjacent unprotected prompt tokens whose
// neighbouring keys have cosine > eps form merging sets (Algorithm 1, a chaining
// rule); each set collapses into its pivot (the token with the most accumulated
// attention) with Gaussian-kernel weights around the pivot's key (Algorithm 2,
// Eq. 4). Recent and heavy-hitter tokens are protected (kept verbatim). Prefill
// only; decoded tokens are appended. The budget mechanism, sigma and the value
// scaling are reconstructions: docs/algorithms/kvmerger.md.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scores.hpp"

namespace kvscope::ref {

FamilyInfo kvmerger_family();

/// Resolved KVMerger switches (the family's parameters).
struct KVMergerConfig {
  enum class Mode { kThreshold, kBudget, kCapped };
  enum class Sigma { kMeanDistance, kFixed, kLiteral };
  Mode mode = Mode::kThreshold;
  double eps = 0.75;
  double recent = 0.0017;  // fraction of the n tokens (after the unit conversion)
  double heavy = 0.0012;   // fraction of the n tokens
  Sigma sigma_mode = Sigma::kMeanDistance;
  double sigma = 5.0;      // used by Sigma::kFixed
  bool scaled_values = true;
  Reduce gqa = Reduce::kMean;
  std::vector<int> skip_layers;  // negative = from the end (-1 = last layer)

  /// ceil(recent * n) (ceil(heavy * n) clamped to what is left), with 1e-9 slack on exact products.
  std::int64_t recent_count(std::int64_t n) const;
  std::int64_t heavy_count(std::int64_t n) const;
  /// Whether layer `layer` of `layers` is left uncompressed.
  bool skipped(int layer, int layers) const;
};

/// Cosine similarity of two keys; 1 when both are zero, 0 when exactly one is; clamped to [-1, 1].
double key_cosine(const VecX& a, const VecX& b);

/// Gaussian-kernel merge weights (Eq. 4) of the keys `K.row(set[i])` around the
/// pivot `set[pivot]`: w_i = g_i / sum g with g_i = exp(-|k_p - k_i|^2 / (2 sigma^2));
/// sigma = 0 gives every g = 1. `sigma_out` receives the sigma used.
std::vector<double> kvmerger_weights(const MatX& K, const std::vector<std::int64_t>& set, std::size_t pivot,
                                     const KVMergerConfig& c, double* sigma_out = nullptr);

/// The family's parameters resolved (Error(kUsage) on bad values).
KVMergerConfig kvmerger_config(const Params& p);

/// The merge decisions of one kv head, shared by every backend: which tokens
/// are protected (recent band + heavy hitters by `score`) and which adjacent
/// edges (j, j+1) merge (Algorithm 1's chaining rule; in budget/capped modes
/// the highest-cosine edges). Inputs are the edge cosines (length T - 1; only
/// edges between unprotected tokens are read) and the pivot/heavy scores
/// (length T). Throws Error(kImpossibleBudget) as kvmerger_head_plan.
struct KVMergerEdges {
  std::vector<char> merge;                    // T - 1 (empty when T < 2)
  std::vector<std::int64_t> protected_tokens; // ascending
  /// Smallest relative margin of these decisions (heavy top-k, edge cosine vs
  /// eps or vs the rank boundary): differential checks call a differing plan a tie below delta.
  double margin = 0;
};
KVMergerEdges kvmerger_edges(const VecX& cosine, const VecX& score, std::int64_t budget, const KVMergerConfig& c);

/// The same decisions with the caller's top-k in place of ref::top_k (a
/// backend's kernel, which must keep exactly ref::top_k's set and raise its
/// errors). The edges' margin is only meaningful with ref::top_k's margins.
using TopKFn = std::function<Selection(const VecX& scores, std::span<const std::int64_t> candidates, std::int64_t k)>;
KVMergerEdges kvmerger_edges(const VecX& cosine, const VecX& score, std::int64_t budget, const KVMergerConfig& c,
                             const TopKFn& select);

/// One kv head's KVMerger plan over the T rows of K with pivot/heavy scores
/// `score` (length T), for budget B. Throws Error(kImpossibleBudget) in budget
/// and capped modes when the adjacent unprotected pairs cannot absorb T - B merges.
Plan kvmerger_head_plan(const MatX& K, const VecX& score, std::int64_t budget, const KVMergerConfig& c,
                        std::vector<std::int64_t>* protected_out = nullptr);

}  // namespace kvscope::ref
