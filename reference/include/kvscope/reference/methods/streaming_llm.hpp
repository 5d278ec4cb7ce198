// StreamingLLM (Xiao et al., ICLR 2024, "Efficient Streaming Language Models
// with Attention Sinks"): keep the first `sinks` tokens and the most recent
// `recent` ones; evict the middle. Content-independent: the kept set depends
// only on (n, sinks, recent) and is the same for every layer and head.
// docs/algorithms/streaming_llm.md lists presets and sources.
#pragma once

#include "kvscope/reference/registry.hpp"

namespace kvscope::ref {

FamilyInfo streaming_llm_family();

/// Kept original indices of an n-token cache: [0, sinks) ∪ [max(sinks, n - recent), n).
std::vector<std::int64_t> streaming_kept(std::int64_t n, std::int64_t sinks, std::int64_t recent);

}  // namespace kvscope::ref
