// DynamicKV's cross-layer selection (dynamic_v11.py's torch.topk over the
// gathered scores of the first n layers): how many of the k best entries of
// layers 0..n-1 fall in each layer, for every prefix n the schedule visits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvscope::ref {

/// Entries are flat: layer-major, `per_layer` each. The k best are a stable
/// top-k: higher value first, the lower flat index on equal values (-0 equals
/// +0). Values must not be NaN.
///
/// Visiting every prefix with a fresh selection costs O(L^2 * per_layer). Here
/// each layer's entries are bucketed once by the top 16 bits of an
/// order-preserving key of their value; a prefix's k-th entry is then found from
/// the bucket counts, and only that one bucket is searched.
class DynamicKVPrefixTopK {
 public:
  DynamicKVPrefixTopK(std::vector<double> flat, std::int64_t per_layer, int layers);

  /// counts[l] for l < n: entries of layer l among the k best of layers
  /// 0..n-1 (k clamped to [0, n * per_layer]).
  std::vector<std::int64_t> counts(int n, std::int64_t k) const;

 private:
  static constexpr int kBucketBits = 16;
  static constexpr std::size_t kBuckets = std::size_t{1} << kBucketBits;

  std::vector<double> flat_;
  std::int64_t per_layer_;
  int layers_;
  /// before_[l * (kBuckets + 1) + b]: entries of layer l in buckets < b (bucket 0 holds the largest values).
  std::vector<std::int64_t> before_;
  /// Per layer (at l * per_layer): its flat indices by bucket, then by index.
  std::vector<std::int64_t> by_bucket_;
};

}  // namespace kvscope::ref
