// DynamicKV (Zhou et al., arXiv 2412.14838, EMNLP 2025 Findings, "DynamicKV:
// Task-Aware Adaptive KV Cache Compression for Long Context LLMs"):
// layer-adaptive eviction at prefill. Every layer keeps the observation window
// plus its top pooled-window-score tokens; every `interval` layers the budgets
// of all layers so far are re-allocated from a global top-k over every
// layer's and head's scores. Code-faithful to the authors' repository
// (DreamMr/DynamicKV, kv_compression/token_drop/methods/dynamic_v11.py,
// DynamicKVClusterV11); docs/algorithms/dynamickv.md lists the presets, the
// sources and what had to be reconstructed.
#pragma once

#include <cstdint>
#include <vector>

#include "kvscope/reference/methods/dynamickv_topk.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scores.hpp"

namespace kvscope::ref {

enum class DynamicKVMode {
  kBitFaithful,  // the official slicing, duplicate-window quirk included (reported)
  kIntended,     // an update never gives a layer more than it still holds (<= Bmax)
};

/// The family's parameters, resolved (docs/algorithms/dynamickv.md).
struct DynamicKVConfig {
  std::int64_t window = 8;  // observation window w (clamped to T where used)
  double r_max = 10;
  std::int64_t kernel = 7;  // pooling kernel (odd)
  Pool pool = Pool::kAvg;
  std::int64_t interval = 4;
  DynamicKVMode mode = DynamicKVMode::kBitFaithful;
  Reduce group = Reduce::kMean;  // q heads -> kv head
  std::int64_t effective_window(std::int64_t T) const;
};

/// Parses and checks the parameters (registry-resolved spec).
DynamicKVConfig dynamickv_config(const Params& p);

/// Everything the budget schedule needs besides the scores.
struct DynamicKVScheduleConfig {
  int layers = 1;               // L, all layers of the model
  std::int64_t window = 8;      // w (already clamped to T by the caller)
  std::int64_t base = 0;        // b = C - w >= 0
  double r_max = 10.0;          // radio_max
  std::int64_t interval = 4;    // m: update after layers m-1, 2m-1, ...
  DynamicKVMode mode = DynamicKVMode::kBitFaithful;
};

/// One re-allocation (update_and_reset_budget) after layer `layer`.
struct DynamicKVUpdate {
  int layer = 0;                        // l; the update covers layers 0..l
  std::int64_t topk = 0;                // min(tau, |Z|), tau = b * H * (l + 1)
  std::vector<std::int64_t> counts;     // c_j after the integer division (and the last-layer fix)
  std::vector<std::int64_t> scaled;     // u_j = int(Bmax * t_j), t_j in float32 as torch
  double rho = 0;                       // ss_radio = sum(u) / (b L)
  bool fallback = false;                // sum(c) == 0 or rho == 0: uniform b (the code divides by zero)
  std::vector<std::int64_t> budgets;    // B_j before clipping; sums to b L
  std::vector<std::int64_t> clipped;    // slice lengths: min(B_j, Lp) (bit-faithful), also <= held (intended)
};

/// One entry of a layer's cache layout: rank r of a head's score-sorted
/// prefix list (>= 0), or window token u encoded as -(u + 1).
using DynamicKVEntry = std::int64_t;

struct DynamicKVSchedule {
  std::int64_t bmax = 0;                                // min(int(r_max b), Lp)
  std::vector<std::vector<DynamicKVEntry>> layout;      // per layer, the official cache, in cache order
  std::vector<std::int64_t> prefix;                     // per layer: distinct prefix tokens kept per head
  std::vector<std::int64_t> duplicates;                 // per layer: window tokens present twice (bit-faithful)
  std::vector<DynamicKVUpdate> updates;
  /// Tokens each head of layer l keeps: prefix[l] + window.
  std::int64_t kept(int layer, std::int64_t window) const {
    return prefix[static_cast<std::size_t>(layer)] + window;
  }
};

/// The official budget schedule, a pure function of every layer's pooled
/// scores `scores[l][h]` (each of length Lp = T - w, h over the heads the
/// authors score: the q heads after repeat_kv). Reproduces
/// budget_compute_per_layer / update_and_reset_budget operation by operation:
/// Python integer and float floor divisions, torch's float32 t_j, the
/// last-layer correction (only when sum(c) != H Lp), the final B_{n-1} fix so
/// that sum_j B_j = b L, and the slice k_cache[:, :, :B_j] ++ window. Ties in
/// the global top-k go to the lower flat index (layer, head, token). The top-k's passes go over
/// the layers through `for_each_layer` (prefix_topk_counts; empty: one after another).
DynamicKVSchedule dynamickv_schedule(const std::vector<std::vector<VecX>>& scores, const DynamicKVScheduleConfig& c,
                                     const ForEachIndex& for_each_layer = {});

/// One layer's pooled scores in fp32, flat [heads, Lp] (a backend's kernel output).
struct DynamicKVFlatScores {
  int heads = 0;
  std::vector<float> values;
};

/// The same schedule over fp32 scores: equal to widening them to double first (exact, same order
/// and ties), without the copy.
DynamicKVSchedule dynamickv_schedule(const std::vector<DynamicKVFlatScores>& scores, const DynamicKVScheduleConfig& c,
                                     const ForEachIndex& for_each_layer = {});

/// The schedule's configuration for an L-layer model with T prompt tokens at
/// `budget` per head; Error(kImpossibleBudget) when budget < the window.
DynamicKVScheduleConfig dynamickv_schedule_config(const DynamicKVConfig& c, int layers, std::int64_t T,
                                                  std::int64_t budget);

/// Python's float floor division a // b (CPython float_floor_div), for tests.
double python_floordiv(double a, double b);

/// Pooled window scores of one layer, per q head, over the Lp = T - w past
/// tokens (sum over the w window rows of causal softmax, avg/max pooling
/// with torch edge semantics): what the authors keep in advance_attn_cache.
std::vector<VecX> dynamickv_layer_scores(const LayerInput& in, std::int64_t window, std::int64_t kernel, Pool pool);

FamilyInfo dynamickv_family();

}  // namespace kvscope::ref
