// Per-head top-k selection (the reference's top_k contract: higher score
// first, equal scores keep the lower index), and segmentation of adjacent
// keys into merge sets.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kvscope/opt/cpu/storage.hpp"

namespace kvscope::opt::cpu {

/// The candidate tokens of a selection, with the facts about their layout
/// that top_k's fast paths need, found once for the rows (kv heads) that
/// share them: a scan of thousands of tokens per row was a sixth of top_k.
struct Candidates {
  explicit Candidates(std::span<const std::int64_t> candidates);
  std::span<const std::int64_t> tokens;
  bool increasing = false;  // strictly, every token in [0, UINT32_MAX]
  bool range = false;       // increasing by one: scores read without a gather
};

/// The k best of `candidates` by `scores` (indexed by token), written to
/// `kept` in ascending token order. k is clamped to the candidate count.
/// O(n): a histogram pass over the scores (under AVX-512, over a band that a
/// sample of them picks), then nth_element inside one bucket.
/// Scores must not be NaN.
void top_k(const float* scores, const Candidates& candidates, std::int64_t k, std::vector<std::int64_t>& kept);
void top_k(const float* scores, std::span<const std::int64_t> candidates, std::int64_t k,
           std::vector<std::int64_t>& kept);

/// Whether any of x[0..n) is NaN (top_k's precondition, checked a row at a
/// time before the indexed search for the first NaN candidate).
bool any_nan(const float* x, std::int64_t n);

/// cos(k_j, k_{j+1}) of every adjacent key pair of each kv head (math::cosine on
/// keys scaled by a power of two each, so tiny keys keep their direction): out [kv_heads, T - 1].
template <class S>
void adjacent_key_cosine(const LayerShape& s, const S* k, float* out);

}  // namespace kvscope::opt::cpu
