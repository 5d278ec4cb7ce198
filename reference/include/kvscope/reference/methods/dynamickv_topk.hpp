// DynamicKV's cross-layer selection (dynamic_v11.py's torch.topk over the
// gathered scores of the first n layers): how many of the k best entries of
// layers 0..n-1 fall in each layer, for every prefix n the schedule visits.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kvscope/core/for_each.hpp"

namespace kvscope::ref {

/// One prefix selection: the k best entries of layers 0..n-1.
struct PrefixTopKQuery {
  int n = 0;
  std::int64_t k = 0;
};

/// For each query, counts[l] for l < n: entries of layer l among the k best
/// of layers 0..n-1 (n clamped to [0, layers], k to [0, n * per_layer]).
///
/// Entries are per layer, `layers[l][i]` with flat index l * per_layer + i
/// (every layer holds per_layer entries). The k best are a stable top-k:
/// higher value first, the lower flat index on equal values (-0 equals +0).
/// Values must not be NaN. `V` is double (the reference's scores) or float (a
/// backend's, read in place: widening them to double keeps order and ties).
///
/// A fresh selection per prefix costs O(L^2 * per_layer). Here every entry is
/// bucketed by an order-preserving integer key of its value, scaled to the
/// keys' range; per-layer bucket counts locate each query's k-th entry in one
/// bucket, and one more pass collects the entries of just those buckets,
/// among which the rest of the selection is made. Three passes over the
/// values in all, whatever the number of queries, each over the layers
/// through `for_each_layer` (empty: in turn).
template <class V>
std::vector<std::vector<std::int64_t>> prefix_topk_counts(std::span<const std::span<const V>> layers,
                                                          std::span<const PrefixTopKQuery> queries,
                                                          const ForEachIndex& for_each_layer = {});

extern template std::vector<std::vector<std::int64_t>> prefix_topk_counts<double>(
    std::span<const std::span<const double>>, std::span<const PrefixTopKQuery>, const ForEachIndex&);
extern template std::vector<std::vector<std::int64_t>> prefix_topk_counts<float>(
    std::span<const std::span<const float>>, std::span<const PrefixTopKQuery>, const ForEachIndex&);

}  // namespace kvscope::ref
