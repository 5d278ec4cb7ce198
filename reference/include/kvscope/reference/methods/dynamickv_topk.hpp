// DynamicKV's cross-layer selection (dynamic_v11.py's torch.topk over the
// gathered scores of the first n layers): how many of the k best entries of
// layers 0..n-1 fall in each layer, for every prefix n the schedule visits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace kvscope::ref {

/// Entries are per layer, `layers[l][i]` with flat index l * per_layer + i
/// (every layer holds per_layer entries). The k best are a stable top-k:
/// higher value first, the lower flat index on equal values (-0 equals +0).
/// Values must not be NaN. `V` is double (the reference's scores) or float (a
/// backend's, read in place: widening them to double keeps order and ties).
///
/// Visiting every prefix with a fresh selection costs O(L^2 * per_layer). Here
/// each layer's entries are bucketed once by an order-preserving integer key
/// of their value, scaled to the keys' range so that 2^16 buckets spread over
/// the values actually present; a prefix's k-th entry is then found by a
/// binary search over the bucket counts, and only that one bucket is searched.
template <class V>
class DynamicKVPrefixTopK {
 public:
  /// Views, not copies: the layers' values must outlive the object.
  explicit DynamicKVPrefixTopK(std::vector<std::span<const V>> layers);

  /// counts[l] for l < n: entries of layer l among the k best of layers
  /// 0..n-1 (k clamped to [0, n * per_layer]).
  std::vector<std::int64_t> counts(int n, std::int64_t k) const;

 private:
  static constexpr int kBucketBits = 16;
  static constexpr std::size_t kBuckets = std::size_t{1} << kBucketBits;

  std::size_t bucket_of(V x) const;

  std::vector<std::span<const V>> layers_;
  std::int64_t per_layer_ = 0;
  std::uint64_t top_key_ = 0;  // the largest value's key
  int shift_ = 0;              // bucket = (top_key_ - key) >> shift_: bucket 0 holds the largest values
  /// before_[l * (kBuckets + 1) + b]: entries of layer l in buckets < b.
  std::vector<std::int64_t> before_;
  /// Per layer (at l * per_layer): its entries' indices within the layer, by bucket, then by index.
  std::vector<std::uint32_t> by_bucket_;
};

extern template class DynamicKVPrefixTopK<double>;
extern template class DynamicKVPrefixTopK<float>;

}  // namespace kvscope::ref
