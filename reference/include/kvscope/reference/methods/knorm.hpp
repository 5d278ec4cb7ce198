// KNorm (Devoto et al., EMNLP 2024, "A Simple and Effective L2 Norm-Based
// Strategy for KV Cache Compression", arXiv 2406.11430): keep the prompt keys
// with the lowest L2 norm, per kv head. Prefill only. The scorer is public so
// head-adaptive allocation (AdaKV) can wrap it. docs/algorithms/knorm.md.
#pragma once

#include "kvscope/reference/registry.hpp"

namespace kvscope::ref {

FamilyInfo knorm_family();

/// s_j = -||k_j||_2 for every row of K (higher = more worth keeping).
VecX knorm_scores(const MatX& K);

}  // namespace kvscope::ref
