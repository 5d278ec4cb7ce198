#include "kvscope/reference/methods/dynamickv_topk.hpp"

#include <algorithm>
#include <bit>
#include <limits>
#include <string>

#include "kvscope/core/error.hpp"

namespace kvscope::ref {
namespace {

/// An unsigned key that rises with the value (IEEE order; -0 and +0 share one key).
std::uint64_t rising_key(double x) {
  const auto u = std::bit_cast<std::uint64_t>(x == 0.0 ? 0.0 : x);
  return (u >> 63) != 0 ? ~u : u | (std::uint64_t{1} << 63);
}
std::uint64_t rising_key(float x) {
  const auto u = std::bit_cast<std::uint32_t>(x == 0.0f ? 0.0f : x);
  return (u >> 31) != 0 ? ~u : u | (std::uint32_t{1} << 31);
}

}  // namespace

template <class V>
std::size_t DynamicKVPrefixTopK<V>::bucket_of(V x) const {
  return static_cast<std::size_t>((top_key_ - rising_key(x)) >> shift_);
}

template <class V>
DynamicKVPrefixTopK<V>::DynamicKVPrefixTopK(std::vector<std::span<const V>> layers) : layers_(std::move(layers)) {
  const auto L = static_cast<std::int64_t>(layers_.size());
  per_layer_ = layers_.empty() ? 0 : static_cast<std::int64_t>(layers_.front().size());
  for (const auto& layer : layers_)
    if (static_cast<std::int64_t>(layer.size()) != per_layer_)
      throw Error(ErrorKind::kInternal, "dynamickv: the prefix top-k needs as many entries in every layer");
  if (per_layer_ > std::numeric_limits<std::uint32_t>::max())
    throw Error(ErrorKind::kUsage, "dynamickv: more than 2^32 scores per layer (" + std::to_string(per_layer_) + ")");
  // The keys' range sets the bucket width: the fewest low bits dropped that
  // leave at most kBuckets buckets between the smallest and the largest key.
  std::uint64_t lo = std::numeric_limits<std::uint64_t>::max(), hi = 0;
  for (const auto& layer : layers_)
    for (V x : layer) {
      const std::uint64_t key = rising_key(x);
      lo = std::min(lo, key);
      hi = std::max(hi, key);
    }
  top_key_ = hi;
  while (per_layer_ > 0 && ((hi - lo) >> shift_) >= kBuckets) ++shift_;

  before_.assign(static_cast<std::size_t>(L) * (kBuckets + 1), 0);
  by_bucket_.resize(static_cast<std::size_t>(L * per_layer_));
  std::vector<std::uint16_t> bucket(static_cast<std::size_t>(per_layer_));
  std::vector<std::int64_t> next(kBuckets);
  for (std::int64_t l = 0; l < L; ++l) {
    std::int64_t* before = &before_[static_cast<std::size_t>(l) * (kBuckets + 1)];
    const std::span<const V> layer = layers_[static_cast<std::size_t>(l)];
    for (std::int64_t i = 0; i < per_layer_; ++i) {
      const std::size_t b = bucket_of(layer[static_cast<std::size_t>(i)]);
      bucket[static_cast<std::size_t>(i)] = static_cast<std::uint16_t>(b);
      ++before[b + 1];
    }
    for (std::size_t b = 0; b < kBuckets; ++b) before[b + 1] += before[b];
    std::copy(before, before + kBuckets, next.begin());  // a counting sort, stable in the index
    std::uint32_t* out = by_bucket_.data() + l * per_layer_;  // (empty layers: no element to index)
    for (std::int64_t i = 0; i < per_layer_; ++i)
      out[next[bucket[static_cast<std::size_t>(i)]]++] = static_cast<std::uint32_t>(i);
  }
}

template <class V>
std::vector<std::int64_t> DynamicKVPrefixTopK<V>::counts(int n, std::int64_t k) const {
  n = std::clamp(n, 0, static_cast<int>(layers_.size()));
  std::vector<std::int64_t> counts(static_cast<std::size_t>(n), 0);
  k = std::clamp<std::int64_t>(k, 0, n * per_layer_);
  if (k == 0) return counts;
  const auto before = [&](int l, std::size_t b) { return before_[static_cast<std::size_t>(l) * (kBuckets + 1) + b]; };
  const auto taken_before = [&](std::size_t b) {  // entries of layers 0..n-1 in buckets < b
    std::int64_t s = 0;
    for (int l = 0; l < n; ++l) s += before(l, b);
    return s;
  };
  // The bucket that holds the k-th entry, b: the first whose end reaches k
  // (taken_before rises with b). Every entry of the buckets before it is taken.
  std::size_t lo = 0, hi = kBuckets - 1;
  while (lo < hi) {
    const std::size_t mid = lo + (hi - lo) / 2;
    if (taken_before(mid + 1) >= k)
      hi = mid;
    else
      lo = mid + 1;
  }
  const std::size_t b = lo;
  const std::int64_t taken = taken_before(b);
  std::vector<std::int64_t> tied;  // the bucket's entries (flat indices), best first after the selection
  for (int l = 0; l < n; ++l) {
    counts[static_cast<std::size_t>(l)] = before(l, b);
    const std::uint32_t* first = by_bucket_.data() + l * per_layer_ + before(l, b);
    for (std::int64_t e = 0; e < before(l, b + 1) - before(l, b); ++e) tied.push_back(l * per_layer_ + first[e]);
  }
  const std::int64_t rest = k - taken;
  const auto value = [&](std::int64_t flat) {
    return layers_[static_cast<std::size_t>(flat / per_layer_)][static_cast<std::size_t>(flat % per_layer_)];
  };
  const auto better = [&](std::int64_t i, std::int64_t j) {
    const V x = value(i), y = value(j);
    return x != y ? x > y : i < j;
  };
  std::nth_element(tied.begin(), tied.begin() + (rest - 1), tied.end(), better);
  for (std::int64_t i = 0; i < rest; ++i) ++counts[static_cast<std::size_t>(tied[static_cast<std::size_t>(i)] / per_layer_)];
  return counts;
}

template class DynamicKVPrefixTopK<double>;
template class DynamicKVPrefixTopK<float>;

}  // namespace kvscope::ref
