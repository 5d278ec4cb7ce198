// EMS (Li, Li, Meng, Ma, Geng, Xia, Wang, arXiv 2412.08521, "EMS: Adaptive
// Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on
// Global-Local Importance"): head-wise evict-then-merge.
// A Global-Local score (accumulated attention and window attention, each
// divided by its mean) picks B - w centres per kv head; the next tokens by
// score are merged into their most similar centre (attention-weighted values,
// norm-preserving keys) and the rest evicted, the merge share adapting per head
// to attention sparsity and KV redundancy. No official code exists: the
// equations are reconstructed (docs/algorithms/ems.md says from what) and
// every uncertain choice is a parameter.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scores.hpp"

namespace kvscope::ref {

enum class EmsCombiner { kSum, kMax, kWeighted };
enum class EmsSimilarity { kKeyValue, kKeys };
enum class EmsMergeWeights { kScore, kAttention };

struct EmsConfig {
  std::int64_t window = 8;      // recent tokens kept verbatim (shrinks to the budget when larger)
  std::int64_t obs_window = 8;  // queries whose attention forms s_Loc
  EmsCombiner combiner = EmsCombiner::kSum;
  double lambda = 0.5;          // kWeighted: lambda * global + (1 - lambda) * local
  bool share_fixed = false;     // true: beta = share_value for every head
  double share_value = 0;
  double share_gain = 1.0;      // adaptive: beta = clamp(gain * max(0, redundancy) * (1 - sparsity), 0, 1)
  EmsSimilarity similarity = EmsSimilarity::kKeyValue;
  double tau = 0.0;             // similarity below tau sends a to-be-merged token to the zero class
  EmsMergeWeights weights = EmsMergeWeights::kScore;
  Reduce group = Reduce::kMean;  // over the q heads of a GQA group
  bool recompress = true;       // decode: compress again when a head exceeds the budget
  std::int64_t every = 1;       // ... when it holds budget + every slots
};

/// What one compression sees of one kv head: items are prompt tokens at
/// prefill, cache slots during decoding.
struct EmsItems {
  const MatX* K = nullptr;  // [n x d], the items' (possibly merged) keys
  const MatX* V = nullptr;  // [n x d]
  VecX glo;                 // s_Glo per item (accumulated attention)
  VecX loc;                 // s_Loc per item (attention of the recent queries)
  std::vector<std::int64_t> position;  // original position of each item (its centre token)
};

enum class EmsClass : signed char { kWindow, kCentre, kMerged, kZero };

struct EmsResult {
  Plan plan;                          // over the items, slots in position order
  VecX score;                         // s_GL per item
  std::vector<EmsClass> cls;          // per item
  std::vector<std::int64_t> centre;   // per item: the centre item it merged into, else -1
  std::int64_t window = 0, n_imp = 0, n_tbm = 0, n_irr = 0;  // n_tbm: tokens chosen to merge (some may fall to zero)
  double sparsity = 0, redundancy = 0, share = 0;
  /// Smallest relative margin of the decisions taken (centre and merge cuts by
  /// s_GL, the share's rounding, tau, the best centre against the runner-up,
  /// weights near 0, a cancelling key merge); 0 = a tie; +inf when none.
  double margin = 0;
};

/// Assignment of the non-centre candidates to centres (the hot part of a
/// compression, O(rest x centres x d)): per rest item, in the order given.
struct EmsAssignment {
  std::vector<double> best;          // highest similarity to a centre that can take members (-inf: none)
  std::vector<double> second;        // runner-up among those centres (-inf: none)
  std::vector<std::int64_t> centre;  // the best centre (earliest in position order on equal similarity),
                                     // -1 = zero class (no centre can take members, or best < tau)
  std::vector<double> any;           // highest similarity to any centre (redundancy), -inf: no centre
};
/// (rest items, centre items in position order, per centre whether it can take members) -> assignment.
using EmsAssignFn = std::function<EmsAssignment(const std::vector<std::int64_t>& rest,
                                                const std::vector<std::int64_t>& centres,
                                                const std::vector<char>& can_take)>;

/// The reference's assignment in double (ems_similarity over items.K/V).
EmsAssignment ems_assign(const MatX& K, const MatX& V, const std::vector<std::int64_t>& rest,
                         const std::vector<std::int64_t>& centres, const std::vector<char>& can_take,
                         const EmsConfig& c);

/// s_GL = combine(s_Glo / mean(s_Glo), s_Loc / mean(s_Loc)); a component
/// whose mean is 0 contributes 0. Invariant to positive rescaling of either.
VecX ems_global_local(const VecX& glo, const VecX& loc, const EmsConfig& c);

/// Similarity of items x and y (kKeyValue: cos(k) * cos(v); kKeys: cos(k));
/// a zero vector has cosine 0 with everything.
double ems_similarity(const MatX& K, const MatX& V, std::int64_t x, std::int64_t y, EmsSimilarity s);

/// One head's evict-then-merge to `budget` slots (n <= budget: identity).
/// budget < 0 is Error(kImpossibleBudget). `assign` (nullable) replaces the
/// reference's assignment (a backend's kernel); every decision stays here.
EmsResult ems_compress(const EmsItems& items, std::int64_t budget, const EmsConfig& c,
                       const EmsAssignFn* assign = nullptr);

/// Prefill scores of kv head g: s_Glo (accumulated attention, trace colsum
/// when recorded) and s_Loc (window attention of the last obs_window queries),
/// each reduced over the group's q heads.
void ems_prefill_scores(const LayerInput& in, int kv_head, const EmsConfig& c, VecX& glo, VecX& loc);

/// Parses the `share` parameter: "adaptive" or a fixed share x in [0, 1]
/// (written as a bare number: ':' separates parameters in a method spec).
void ems_parse_share(const std::string& text, EmsConfig& c);

/// The family's parameters resolved (Error(kUsage) on bad values).
EmsConfig ems_config(const Params& p);

FamilyInfo ems_family();

}  // namespace kvscope::ref
