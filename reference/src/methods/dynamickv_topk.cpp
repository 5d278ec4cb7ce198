#include "kvscope/reference/methods/dynamickv_topk.hpp"

#include <algorithm>
#include <bit>
#include <limits>
#include <string>
#include <type_traits>

#include "kvscope/core/error.hpp"

namespace kvscope::ref {
namespace {

/// Buckets of the value keys. 2^12 counts per layer (16 KiB) stay in L1
/// while a layer is counted; the bucket holding a k-th entry then holds a few
/// thousand entries (at 2^16 the per-layer counts missed the cache, and
/// sorting every entry by bucket was most of a 32-layer schedule).
constexpr int kBucketBits = 12;
constexpr std::size_t kBuckets = std::size_t{1} << kBucketBits;

/// An unsigned key that rises with the value (IEEE order; -0 and +0 share one
/// key): the bits with the sign flipped, or all flipped for a negative value.
/// Branch-free (x + 0 is x, but +0 for -0).
template <class V>
using KeyOf = std::conditional_t<sizeof(V) == 4, std::uint32_t, std::uint64_t>;
template <class V>
KeyOf<V> rising_key(V x) {
  using U = KeyOf<V>;
  const auto u = std::bit_cast<U>(x + V{0});
  constexpr U sign = U{1} << (8 * sizeof(U) - 1);
  const U negative = U{0} - (u >> (8 * sizeof(U) - 1));  // all ones for a negative value
  return u ^ (negative | sign);
}

/// Values to buckets: bucket 0 holds the largest values.
template <class V>
struct Bucketing {
  KeyOf<V> top_key = 0;  // the largest value's key
  int shift = 0;         // the fewest low key bits dropped that leave at most kBuckets buckets
  std::uint16_t operator()(V x) const { return static_cast<std::uint16_t>((top_key - rising_key(x)) >> shift); }
};

/// The least and greatest value of one layer (+inf and -inf when empty), in
/// eight running extremes unrolled into registers: one chain of dependent
/// mins, or eight through memory, is several times slower.
template <class V>
std::pair<V, V> extremes_of(std::span<const V> layer) {
  constexpr std::size_t kChains = 8;
  V lo[kChains], hi[kChains];
  std::fill(lo, lo + kChains, std::numeric_limits<V>::infinity());
  std::fill(hi, hi + kChains, -std::numeric_limits<V>::infinity());
  std::size_t i = 0;
  for (; i + kChains <= layer.size(); i += kChains)
#pragma GCC unroll 8
    for (std::size_t u = 0; u < kChains; ++u) {
      lo[u] = std::min(lo[u], layer[i + u]);
      hi[u] = std::max(hi[u], layer[i + u]);
    }
  for (; i < layer.size(); ++i) {
    lo[0] = std::min(lo[0], layer[i]);
    hi[0] = std::max(hi[0], layer[i]);
  }
  return {*std::min_element(lo, lo + kChains), *std::max_element(hi, hi + kChains)};
}

/// The bucketing spanning every value of `layers`, from each layer's
/// extremes (rising_key is monotone, so the key range is that of the least
/// and greatest values).
template <class V>
Bucketing<V> bucketing_of(std::span<const std::span<const V>> layers, const ForEachIndex& for_each_layer) {
  const int L = static_cast<int>(layers.size());
  std::vector<std::pair<V, V>> ext(layers.size());
  for_each_layer(L, [&](int l) { ext[static_cast<std::size_t>(l)] = extremes_of(layers[static_cast<std::size_t>(l)]); });
  V lo = std::numeric_limits<V>::infinity(), hi = -std::numeric_limits<V>::infinity();
  bool any = false;
  for (int l = 0; l < L; ++l) {
    any = any || !layers[static_cast<std::size_t>(l)].empty();
    lo = std::min(lo, ext[static_cast<std::size_t>(l)].first);
    hi = std::max(hi, ext[static_cast<std::size_t>(l)].second);
  }
  Bucketing<V> b;
  if (!any) return b;
  const KeyOf<V> lo_key = rising_key(lo);
  b.top_key = rising_key(hi);
  while (((b.top_key - lo_key) >> b.shift) >= kBuckets) ++b.shift;
  return b;
}

}  // namespace

template <class V>
std::vector<std::vector<std::int64_t>> prefix_topk_counts(std::span<const std::span<const V>> layers,
                                                          std::span<const PrefixTopKQuery> queries,
                                                          const ForEachIndex& each) {
  const ForEachIndex for_each_layer = or_in_turn(each);
  const int L = static_cast<int>(layers.size());
  const std::int64_t per_layer = layers.empty() ? 0 : static_cast<std::int64_t>(layers.front().size());
  for (const auto& layer : layers)
    if (static_cast<std::int64_t>(layer.size()) != per_layer)
      throw Error(ErrorKind::kInternal, "dynamickv: the prefix top-k needs as many entries in every layer");
  if (per_layer > std::numeric_limits<std::uint32_t>::max())
    throw Error(ErrorKind::kUsage, "dynamickv: more than 2^32 scores per layer (" + std::to_string(per_layer) + ")");
  const Bucketing<V> bucketing = bucketing_of(layers, for_each_layer);

  // Pass 2: per-layer bucket counts.
  std::vector<std::uint32_t> count(static_cast<std::size_t>(L) * kBuckets, 0);
  for_each_layer(L, [&](int l) {
    std::uint32_t* c = &count[static_cast<std::size_t>(l) * kBuckets];
    for (V x : layers[static_cast<std::size_t>(l)]) ++c[bucketing(x)];
  });
  const auto count_of = [&](int l, std::size_t b) -> std::int64_t { return count[static_cast<std::size_t>(l) * kBuckets + b]; };

  // Each query's bucket: the first whose end, over layers 0..n-1, reaches k.
  // Every entry of the buckets before it is taken.
  struct Located {
    int n = 0;
    std::int64_t k = 0;
    std::size_t bucket = 0;
    std::int64_t taken = 0;            // entries of the buckets before, all selected
    std::vector<std::int64_t> counts;  // of them, per layer
  };
  std::vector<Located> located;
  std::vector<char> wanted(kBuckets, 0);
  for (const PrefixTopKQuery& q : queries) {
    Located a;
    a.n = std::clamp(q.n, 0, L);
    a.k = std::clamp<std::int64_t>(q.k, 0, a.n * per_layer);
    a.counts.assign(static_cast<std::size_t>(a.n), 0);
    if (a.k > 0) {
      for (;; ++a.bucket) {
        std::int64_t here = 0;
        for (int l = 0; l < a.n; ++l) here += count_of(l, a.bucket);
        if (a.taken + here >= a.k) break;
        a.taken += here;
        for (int l = 0; l < a.n; ++l) a.counts[static_cast<std::size_t>(l)] += count_of(l, a.bucket);
      }
      wanted[a.bucket] = 1;
    }
    located.push_back(std::move(a));
  }

  // Pass 3: the entries (flat indices, ascending) of every wanted bucket,
  // each layer's collected on its own, then joined in layer order.
  std::vector<int> slot(kBuckets, -1);  // a wanted bucket's place among them
  std::vector<std::size_t> wanted_buckets;
  for (std::size_t b = 0; b < kBuckets; ++b)
    if (wanted[b]) slot[b] = static_cast<int>(wanted_buckets.size()), wanted_buckets.push_back(b);
  std::vector<std::vector<std::vector<std::int64_t>>> found(static_cast<std::size_t>(L));
  for_each_layer(L, [&](int l) {
    std::vector<std::vector<std::int64_t>>& mine = found[static_cast<std::size_t>(l)];
    mine.resize(wanted_buckets.size());
    const std::span<const V> layer = layers[static_cast<std::size_t>(l)];
    for (std::int64_t i = 0; i < per_layer; ++i) {
      const int at = slot[bucketing(layer[static_cast<std::size_t>(i)])];
      if (at >= 0) mine[static_cast<std::size_t>(at)].push_back(l * per_layer + i);
    }
  });
  std::vector<std::vector<std::int64_t>> members(kBuckets);
  for (std::size_t w = 0; w < wanted_buckets.size(); ++w) {
    std::vector<std::int64_t>& m = members[wanted_buckets[w]];
    for (const auto& mine : found) m.insert(m.end(), mine[w].begin(), mine[w].end());
  }

  // The rest of each selection among its bucket's entries of layers 0..n-1.
  const auto value = [&](std::int64_t flat) {
    return layers[static_cast<std::size_t>(flat / per_layer)][static_cast<std::size_t>(flat % per_layer)];
  };
  const auto better = [&](std::int64_t i, std::int64_t j) {
    const V x = value(i), y = value(j);
    return x != y ? x > y : i < j;
  };
  std::vector<std::vector<std::int64_t>> out;
  for (Located& a : located) {
    if (a.k > a.taken) {
      const std::vector<std::int64_t>& m = members[a.bucket];
      std::vector<std::int64_t> tied(m.begin(), std::lower_bound(m.begin(), m.end(), a.n * per_layer));
      const std::int64_t rest = a.k - a.taken;
      std::nth_element(tied.begin(), tied.begin() + (rest - 1), tied.end(), better);
      for (std::int64_t i = 0; i < rest; ++i) ++a.counts[static_cast<std::size_t>(tied[static_cast<std::size_t>(i)] / per_layer)];
    }
    out.push_back(std::move(a.counts));
  }
  return out;
}

template std::vector<std::vector<std::int64_t>> prefix_topk_counts<double>(std::span<const std::span<const double>>,
                                                                           std::span<const PrefixTopKQuery>,
                                                                           const ForEachIndex&);
template std::vector<std::vector<std::int64_t>> prefix_topk_counts<float>(std::span<const std::span<const float>>,
                                                                          std::span<const PrefixTopKQuery>,
                                                                          const ForEachIndex&);

}  // namespace kvscope::ref
