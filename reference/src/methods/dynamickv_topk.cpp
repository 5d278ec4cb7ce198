#include "kvscope/reference/methods/dynamickv_topk.hpp"

#include <algorithm>
#include <bit>
#include <utility>

namespace kvscope::ref {
namespace {

/// Bucket of a value: the top bits of a key that falls as the value rises, so
/// bucket 0 holds the largest values and buckets never split equal values.
std::size_t bucket_of(double x, int bits) {
  const auto u = std::bit_cast<std::uint64_t>(x == 0.0 ? 0.0 : x);
  const std::uint64_t rising = (u >> 63) != 0 ? ~u : u | (std::uint64_t{1} << 63);
  return static_cast<std::size_t>(~rising >> (64 - bits));
}

}  // namespace

DynamicKVPrefixTopK::DynamicKVPrefixTopK(std::vector<double> flat, std::int64_t per_layer, int layers)
    : flat_(std::move(flat)), per_layer_(per_layer), layers_(layers) {
  before_.assign(static_cast<std::size_t>(layers) * (kBuckets + 1), 0);
  by_bucket_.resize(flat_.size());
  std::vector<std::size_t> bucket(static_cast<std::size_t>(per_layer));
  for (int l = 0; l < layers; ++l) {
    std::int64_t* before = &before_[static_cast<std::size_t>(l) * (kBuckets + 1)];
    const std::int64_t base = l * per_layer;
    for (std::int64_t i = 0; i < per_layer; ++i) {
      bucket[static_cast<std::size_t>(i)] = bucket_of(flat_[static_cast<std::size_t>(base + i)], kBucketBits);
      ++before[bucket[static_cast<std::size_t>(i)] + 1];
    }
    for (std::size_t b = 0; b < kBuckets; ++b) before[b + 1] += before[b];
    std::vector<std::int64_t> next(before, before + kBuckets);  // a counting sort, stable in the index
    for (std::int64_t i = 0; i < per_layer; ++i)
      by_bucket_[static_cast<std::size_t>(base + next[bucket[static_cast<std::size_t>(i)]]++)] = base + i;
  }
}

std::vector<std::int64_t> DynamicKVPrefixTopK::counts(int n, std::int64_t k) const {
  n = std::clamp(n, 0, layers_);
  std::vector<std::int64_t> counts(static_cast<std::size_t>(n), 0);
  k = std::clamp<std::int64_t>(k, 0, n * per_layer_);
  if (k == 0) return counts;
  const auto before = [&](int l, std::size_t b) { return before_[static_cast<std::size_t>(l) * (kBuckets + 1) + b]; };
  // The bucket that holds the k-th entry: every entry of the buckets before it is taken.
  std::size_t b = 0;
  std::int64_t taken = 0;
  for (;; ++b) {
    std::int64_t in_b = 0;
    for (int l = 0; l < n; ++l) in_b += before(l, b + 1) - before(l, b);
    if (taken + in_b >= k) break;
    taken += in_b;
  }
  std::vector<std::int64_t> tied;  // the bucket's entries, best first after the selection
  for (int l = 0; l < n; ++l) {
    counts[static_cast<std::size_t>(l)] = before(l, b);
    const std::int64_t* first = &by_bucket_[static_cast<std::size_t>(l * per_layer_ + before(l, b))];
    tied.insert(tied.end(), first, first + (before(l, b + 1) - before(l, b)));
  }
  const std::int64_t rest = k - taken;
  const auto better = [&](std::int64_t i, std::int64_t j) {
    const double x = flat_[static_cast<std::size_t>(i)], y = flat_[static_cast<std::size_t>(j)];
    return x != y ? x > y : i < j;
  };
  std::nth_element(tied.begin(), tied.begin() + (rest - 1), tied.end(), better);
  for (std::int64_t i = 0; i < rest; ++i) ++counts[static_cast<std::size_t>(tied[static_cast<std::size_t>(i)] / per_layer_)];
  return counts;
}

}  // namespace kvscope::ref
