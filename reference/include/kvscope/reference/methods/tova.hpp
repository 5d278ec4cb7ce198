// TOVA, Token Omission Via Attention (Oren, Hassid, Yarden, Adi, Schwartz,
// 2024, "Transformers are Multi-State RNNs"): score every cached token by the
// attention the *last* query gives it, averaged over all q heads of the layer,
// and keep the top-B. Layer-wise: every kv head keeps the same tokens. The
// official TOVACache reduces after the prompt and after every decode step;
// kvpress TOVAPress compresses the prompt only and forces the last token kept.
// docs/algorithms/tova.md lists parameters, presets and sources.
#pragma once

#include <cstdint>
#include <vector>

#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scores.hpp"

namespace kvscope::ref {

FamilyInfo tova_family();

/// Prefill scores: the last prompt query's attention over the T prompt keys,
/// the mean over every q head of the layer (sums to 1).
/// Protected tokens of an n-token cache: the newest one when keep_last forces it (kvpress).
std::vector<std::int64_t> tova_protected(std::int64_t n, std::int64_t budget, bool keep_last);

VecX tova_scores(const LayerInput& in);

/// Decode scores per original token j < n: the mean over all q heads h of
/// `probs[h]` at the slot of j in h's kv head (0 where that head holds no j).
/// TOVA keeps one token set per layer, so every kv head contributes alike.
VecX tova_step_scores(const std::vector<HeadCache>& heads, const std::vector<VecX>& probs, std::int64_t n);

}  // namespace kvscope::ref
