#include "kvscope/opt/cpu/select.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <memory>
#include <type_traits>

#include "instantiate.hpp"
#include "simd.hpp"
#include "kvscope/core/kernel_math.hpp"

namespace kvscope::opt::cpu {
namespace {

/// The score's bits as an integer that orders like the score descending (-0
/// as +0). Branch-free, so the key pass vectorises: a negative float's bits
/// stay, a positive one's low 31 flip.
inline std::uint32_t descending_bits(float score) {
  const auto u = std::bit_cast<std::uint32_t>(score == 0.0f ? 0.0f : score);
  const auto negative = static_cast<std::uint32_t>(static_cast<std::int32_t>(u) >> 31);
  return u ^ (~negative & 0x7fffffffu);
}

/// Key whose unsigned order is the selection order: score descending
/// (descending_bits, so -0 and +0 tie), then index ascending in the low 32 bits.
std::uint64_t selection_key(float score, std::int64_t index) {
  return static_cast<std::uint64_t>(descending_bits(score)) << 32 | static_cast<std::uint32_t>(index);
}

bool fits_in_key(std::span<const std::int64_t> candidates) {
  return std::all_of(candidates.begin(), candidates.end(),
                     [](std::int64_t j) { return j >= 0 && j <= static_cast<std::int64_t>(UINT32_MAX); });
}

/// Candidates below which a plain nth_element is as fast as the histogram.
constexpr std::size_t kRadixMin = 256;
/// Buckets of the histogram pass (fits in L1 with the keys streaming past).
constexpr int kBucketBits = 11;

/// The least shift that maps key range [lo, hi] onto 2^bits buckets: the
/// buckets span the keys' own range, so clustered scores (key norms,
/// attention of one scale) still spread over them.
int bucket_shift(std::uint32_t lo, std::uint32_t hi, int bits = kBucketBits) {
  int shift = 0;
  while (((hi - lo) >> shift) >= (1u << bits)) ++shift;
  return shift;
}

/// The kk-th smallest of `keys` (1 <= kk <= size), in O(n): one histogram pass
/// over the score halves, scaled to their [min, max] range so clustered scores
/// (key norms, attention of one scale) still spread over the buckets, then an
/// nth_element over the one bucket that holds the kk-th key.
std::uint64_t kth_smallest(const std::vector<std::uint64_t>& keys, std::size_t kk) {
  if (keys.size() < kRadixMin) {
    std::vector<std::uint64_t> copy = keys;
    std::nth_element(copy.begin(), copy.begin() + static_cast<std::ptrdiff_t>(kk - 1), copy.end());
    return copy[kk - 1];
  }
  std::uint32_t lo = UINT32_MAX, hi = 0;
  for (std::uint64_t key : keys) {
    const auto top = static_cast<std::uint32_t>(key >> 32);
    lo = std::min(lo, top), hi = std::max(hi, top);
  }
  const int shift = bucket_shift(lo, hi);
  const auto bucket = [&](std::uint64_t key) { return (static_cast<std::uint32_t>(key >> 32) - lo) >> shift; };
  std::array<std::uint32_t, 1u << kBucketBits> count{};
  for (std::uint64_t key : keys) ++count[bucket(key)];
  std::uint32_t b = 0;
  std::size_t below = 0;  // keys in buckets before b
  while (below + count[b] < kk) below += count[b++];
  std::vector<std::uint64_t> in_b;
  in_b.reserve(count[b]);
  for (std::uint64_t key : keys)
    if (bucket(key) == b) in_b.push_back(key);
  const std::size_t pos = kk - below - 1;
  std::nth_element(in_b.begin(), in_b.begin() + static_cast<std::ptrdiff_t>(pos), in_b.end());
  return in_b[pos];
}

/// Whether the candidates increase strictly and fit in a key's low half: then
/// a key's position orders like its index, and ties need no index in the key.
bool increasing_in_key(std::span<const std::int64_t> c) {
  if (c.empty() || c.front() < 0 || c.back() > static_cast<std::int64_t>(UINT32_MAX)) return false;
  std::size_t steps_down = 0;  // a count, so the loop vectorises
  for (std::size_t i = 1; i < c.size(); ++i) steps_down += c[i] <= c[i - 1] ? 1 : 0;
  return steps_down == 0;
}

/// Appends to `out` the candidates [j0, j1) whose key is below t (kInclusive:
/// at most t), in order; returns how many. Branch-free: about half are kept,
/// in no predictable pattern. `out` needs room for one past the last kept.
template <bool kInclusive>
std::size_t compact_below(const std::uint32_t* keys, const std::int64_t* candidates, std::size_t j0,
                          std::size_t j1, std::uint32_t t, std::int64_t* out) {
  std::size_t m = 0;
  for (std::size_t j = j0; j < j1; ++j) {
    out[m] = candidates[j];
    // key <= t as the borrow of t - key: written as a compare, GCC merged it
    // with the loop into an unpredictable branch.
    if constexpr (kInclusive)
      m += static_cast<std::size_t>(((std::uint64_t{t} - keys[j]) >> 63) ^ 1u);
    else
      m += keys[j] < t ? 1 : 0;
  }
  return m;
}

/// The kk-th smallest of keys[0, n) (1 <= kk <= n, every key in [lo, hi]),
/// and how many keys are below it. One histogram pass over the keys, its
/// buckets scaled to [lo, hi] so clustered scores (key norms, attention of one
/// scale) still spread over them, then an nth_element inside the one bucket
/// that holds it.
struct KthKey {
  std::uint32_t key;
  std::size_t less;
};
KthKey kth_key_by_histogram(const std::uint32_t* keys, std::size_t n, std::size_t kk, std::uint32_t lo,
                            std::uint32_t hi) {
  // About four keys a bucket, up to 2^kBucketBits: the histogram's zeroing
  // and prefix walk stay small next to a band of a thousand keys.
  const int bits = std::clamp(static_cast<int>(std::bit_width(n)) - 2, 6, kBucketBits);
  const int shift = bucket_shift(lo, hi, bits);
  // Two interleaved histograms: runs of equal scores (clustered key norms)
  // would otherwise make each count wait on the previous increment's store.
  const std::uint32_t kHalf = 1u << bits;
  std::array<std::uint32_t, 2u << kBucketBits> count;
  std::fill_n(count.begin(), 2 * kHalf, 0u);
  std::size_t i = 0;
  for (; i + 2 <= n; i += 2) {
    ++count[(keys[i] - lo) >> shift];
    ++count[((keys[i + 1] - lo) >> shift) + kHalf];
  }
  if (i < n) ++count[(keys[i] - lo) >> shift];
  std::uint32_t b = 0;
  std::size_t below = 0;  // keys in buckets before b
  while (below + count[b] + count[b + kHalf] < kk) below += count[b] + count[b + kHalf], ++b;
  // The bucket's keys, [base, base + width). It holds few: blocks of sixteen
  // are tested at once (vectorised), and only a block with one is scanned.
  const std::uint32_t base = lo + (b << shift), width = 1u << shift;  // shift <= 26
  std::vector<std::uint32_t> in_b;
  in_b.reserve(count[b] + count[b + kHalf]);
  for (std::size_t i0 = 0; i0 < n; i0 += 16) {
    bool any = i0 + 16 > n;  // the tail is scanned as it is
    if (!any)
      for (std::size_t j = i0; j < i0 + 16; ++j) any |= keys[j] - base < width;
    if (any)
      for (std::size_t j = i0; j < std::min(n, i0 + 16); ++j)
        if (keys[j] - base < width) in_b.push_back(keys[j]);
  }
  const std::size_t pos = kk - below - 1;
  std::nth_element(in_b.begin(), in_b.begin() + static_cast<std::ptrdiff_t>(pos), in_b.end());
  const std::uint32_t t = in_b[pos];
  std::size_t less = below;
  for (std::uint32_t key : in_b) less += key < t ? 1 : 0;
  return {t, less};
}

/// The kept candidates in order, given t = the kk-th smallest key and
/// `ties`, how many keys equal to t are kept (the first in candidate order):
/// key <= t up to the last tie taken (`split`), key < t after it. Passes of
/// simple loops: the tie count stops at the block that holds the split, and
/// the two compactions are branch-free.
[[maybe_unused]] void compact_kept(const std::uint32_t* keys, std::span<const std::int64_t> candidates,
                                   std::uint32_t t, std::size_t ties, std::size_t kk, std::vector<std::int64_t>& kept) {
  const std::size_t n = candidates.size();
  // Blocks of sixteen are counted at once (vectorised) until one holds the split.
  std::size_t split = 0, seen = 0;
  for (; split + 16 <= n; split += 16) {
    std::size_t c = 0;
    for (std::size_t j = split; j < split + 16; ++j) c += keys[j] == t ? 1 : 0;
    if (seen + c >= ties) break;
    seen += c;
  }
  for (; seen < ties; ++split) seen += keys[split] == t ? 1 : 0;
  kept.resize(kk + 1);  // compact_below's room
  const std::size_t m = compact_below<true>(keys, candidates.data(), 0, split, t, kept.data());
  compact_below<false>(keys, candidates.data(), split, n, t, kept.data() + m);
  kept.resize(kk);
}

#if KVSCOPE_CPU_AVX512
KVSCOPE_AVX512_WARNINGS_OFF
/// descending_bits of sixteen scores, lane by lane.
inline __m512i descending_bits16(__m512 x) {
  const __m512i u = _mm512_maskz_mov_epi32(_mm512_cmpneq_ps_mask(x, _mm512_setzero_ps()), _mm512_castps_si512(x));
  return _mm512_xor_si512(u, _mm512_andnot_si512(_mm512_srai_epi32(u, 31), _mm512_set1_epi32(0x7fffffff)));
}

/// Keys sampled by band_bounds (at a fixed stride, so the same keys every
/// call), and the least candidate count worth sampling.
constexpr std::size_t kBandSamples = 1024;
constexpr std::size_t kBandMin = 4 * kBandSamples;

/// The key range [lo, hi] that holds the kk-th smallest of n keys, judged
/// from kBandSamples of them (key(q), q < kBandSamples): the sample ranks of
/// its quantile give or take 3.5 standard deviations, widened to whole
/// histogram buckets. An end past the sample's quantiles is the end of all keys.
template <class KeyAt>
std::pair<std::uint32_t, std::uint32_t> band_bounds(std::size_t n, std::size_t kk, KeyAt key) {
  std::array<std::uint32_t, kBandSamples> sample;
  std::uint32_t smin = UINT32_MAX, smax = 0;
  for (std::size_t q = 0; q < kBandSamples; ++q) {
    sample[q] = key(q);
    smin = std::min(smin, sample[q]), smax = std::max(smax, sample[q]);
  }
  constexpr int kBits = 9;
  const int shift = bucket_shift(smin, smax, kBits);
  std::array<std::uint32_t, 1u << kBits> count{};
  for (std::uint32_t k : sample) ++count[(k - smin) >> shift];
  const double p = static_cast<double>(kk) / static_cast<double>(n), target = p * kBandSamples;
  const double margin = 3.5 * std::sqrt(kBandSamples * p * (1.0 - p)) + 2.0;
  std::uint32_t lo = 0, hi = UINT32_MAX;
  std::size_t seen = 0, b = 0;
  if (target - margin > 0) {
    while (static_cast<double>(seen + count[b]) < target - margin) seen += count[b++];
    lo = smin + static_cast<std::uint32_t>(b << shift);
  }
  if (target + margin < kBandSamples) {
    while (static_cast<double>(seen + count[b]) < target + margin) seen += count[b++];
    hi = static_cast<std::uint32_t>(
        std::min<std::uint64_t>(UINT32_MAX, std::uint64_t{smin} + ((std::uint64_t{b} + 1) << shift) - 1));
  }
  return {lo, hi};
}

/// kth_key_by_histogram's answer for the kk-th smallest of the n keys of
/// `scores` at `c` (n >= kBandMin), writing every key to keys[0, n) on the
/// way. A sample picks the band of keys that holds it (band_bounds); one
/// sixteen-lane pass makes the keys, counts those below the band and packs
/// those inside it; the histogram then runs on the band alone (about a tenth
/// of the keys). The scattered increments of the whole histogram were most of
/// top_k's time. False when the kk-th key is outside the band: the sample
/// misjudged the quantile (periodic scores, heavy ties), and the caller
/// counts every key.
bool kth_key_in_band(const float* scores, const Candidates& c, std::size_t kk, std::uint32_t* keys, KthKey& out) {
  const std::size_t n = c.tokens.size(), stride = n / kBandSamples;
  const float* range = c.range ? scores + c.tokens.front() : nullptr;  // the scores in candidate order
  if (!range)
    for (std::size_t i = 0; i < n; ++i) keys[i] = descending_bits(scores[c.tokens[i]]);
  const auto [lo, hi] = band_bounds(n, kk, [&](std::size_t q) {
    const std::size_t i = q * stride + stride / 2;
    return range ? descending_bits(range[i]) : keys[i];
  });
  const std::unique_ptr<std::uint32_t[]> band(new std::uint32_t[n + 16]);  // room for a whole last store
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo)), vwidth = _mm512_set1_epi32(static_cast<int>(hi - lo));
  __m512i bmin = _mm512_set1_epi32(-1), bmax = _mm512_setzero_si512();  // the band's own range
  std::size_t below = 0, m = 0, j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512i k;
    if (range) {
      k = descending_bits16(_mm512_loadu_ps(range + j));
      _mm512_storeu_si512(keys + j, k);
    } else {
      k = _mm512_loadu_si512(keys + j);
    }
    below += static_cast<std::size_t>(std::popcount(static_cast<unsigned>(_mm512_cmplt_epu32_mask(k, vlo))));
    const __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(k, vlo), vwidth);
    bmin = _mm512_mask_min_epu32(bmin, in, bmin, k), bmax = _mm512_mask_max_epu32(bmax, in, bmax, k);
    _mm512_storeu_si512(band.get() + m, _mm512_maskz_compress_epi32(in, k));
    m += static_cast<std::size_t>(std::popcount(static_cast<unsigned>(in)));
  }
  std::uint32_t band_lo = _mm512_reduce_min_epu32(bmin), band_hi = _mm512_reduce_max_epu32(bmax);
  for (; j < n; ++j) {
    if (range) keys[j] = descending_bits(range[j]);
    const std::uint32_t k = keys[j];
    below += k < lo ? 1 : 0;
    if (k - lo <= hi - lo) band[m++] = k, band_lo = std::min(band_lo, k), band_hi = std::max(band_hi, k);
  }
  if (below >= kk || below + m < kk) return false;
  out = kth_key_by_histogram(band.get(), m, kk - below, band_lo, band_hi);
  out.less += below;
  return true;
}

/// The lowest `count` set bits of x.
inline unsigned lowest_set_bits(unsigned x, std::size_t count) {
  unsigned out = 0;
  for (; count > 0 && x != 0; --count) out |= x & (0u - x), x &= x - 1;
  return out;
}

/// compact_kept under AVX-512: one pass, sixteen keys a step, the ties taken
/// by a mask of the first equal lanes in the blocks up to the split. A range
/// of candidates is packed as 32-bit positions and widened, with no load of
/// the candidates.
void compact_kept16(const std::uint32_t* keys, const Candidates& c, std::uint32_t t, std::size_t ties,
                    std::size_t kk, std::vector<std::int64_t>& kept) {
  const std::size_t n = c.tokens.size();
  const std::int64_t* cand = c.tokens.data();
  kept.resize(kk + 16);  // each step stores sixteen lanes
  std::int64_t* out = kept.data();
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(t));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  std::size_t m = 0, j = 0, taken = 0;  // taken: keys equal to t kept so far
  for (; j + 16 <= n; j += 16) {
    const __m512i k = _mm512_loadu_si512(keys + j);
    auto keep = static_cast<unsigned>(_mm512_cmplt_epu32_mask(k, vt));
    if (taken < ties) {
      const auto eq = static_cast<unsigned>(_mm512_cmpeq_epu32_mask(k, vt));
      const auto take = std::min<std::size_t>(static_cast<std::size_t>(std::popcount(eq)), ties - taken);
      keep |= lowest_set_bits(eq, take);
      taken += take;
    }
    if (c.range) {
      const __m512i first = _mm512_set1_epi32(static_cast<int>(cand[0] + static_cast<std::int64_t>(j)));
      const __m512i pos = _mm512_maskz_compress_epi32(static_cast<__mmask16>(keep), _mm512_add_epi32(lanes, first));
      _mm512_storeu_si512(out + m, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(pos)));
      _mm512_storeu_si512(out + m + 8, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(pos, 1)));
    } else {
      const auto lo = static_cast<__mmask8>(keep), hi = static_cast<__mmask8>(keep >> 8);
      const auto n_lo = static_cast<std::size_t>(std::popcount(keep & 0xffu));
      _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi64(lo, _mm512_loadu_si512(cand + j)));
      _mm512_storeu_si512(out + m + n_lo, _mm512_maskz_compress_epi64(hi, _mm512_loadu_si512(cand + j + 8)));
    }
    m += static_cast<std::size_t>(std::popcount(keep));
  }
  for (; j < n; ++j) {
    const bool take_tie = keys[j] == t && taken < ties;
    taken += take_tie ? 1 : 0;
    out[m] = cand[j];
    m += keys[j] < t || take_tie ? 1 : 0;
  }
  kept.resize(kk);
}
KVSCOPE_AVX512_WARNINGS_ON
#endif

/// top_k for increasing candidates, 0 < kk < n, n >= kRadixMin, on 32-bit
/// score keys in candidate order. The kk smallest (key, position) pairs are
/// every key below the kk-th smallest key t, and the first keys equal to t in
/// candidate order. Passes of simple loops: the keys (with their range, or
/// with the band of kth_key_in_band), the search for t, the kept candidates
/// in order. Half the 64-bit path's key bytes.
void top_k_increasing(const float* scores, const Candidates& c, std::size_t kk, std::vector<std::int64_t>& kept) {
  const std::span<const std::int64_t> candidates = c.tokens;
  const std::size_t n = candidates.size();
  const std::unique_ptr<std::uint32_t[]> keys(new std::uint32_t[n]);  // every key written first: no zeroing
  KthKey kth{};
  bool found = false, have_keys = false;
#if KVSCOPE_CPU_AVX512
  have_keys = n >= kBandMin;
  if (have_keys) found = kth_key_in_band(scores, c, kk, keys.get(), kth);
#endif
  if (!found) {
    std::uint32_t lo = UINT32_MAX, hi = 0;
    const float* s = c.range ? scores + candidates.front() : nullptr;  // no gather
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint32_t key = have_keys ? keys[i] : descending_bits(s ? s[i] : scores[candidates[i]]);
      keys[i] = key, lo = std::min(lo, key), hi = std::max(hi, key);
    }
    kth = kth_key_by_histogram(keys.get(), n, kk, lo, hi);
  }
  const std::size_t ties = kk - kth.less;  // keys equal to the kk-th to keep, the first in candidate order
#if KVSCOPE_CPU_AVX512
  compact_kept16(keys.get(), c, kth.key, ties, kk, kept);
#else
  compact_kept(keys.get(), candidates, kth.key, ties, kk, kept);
#endif
}

}  // namespace

bool any_nan(const float* x, std::int64_t n) {
  std::int64_t j = 0;
  bool nan = false;
#if KVSCOPE_CPU_AVX2
  // GCC leaves the scalar loop unvectorised: the unordered compares by hand.
  __m256 any = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    any = _mm256_or_ps(any, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  nan = _mm256_movemask_ps(any) != 0;
#endif
  for (; j < n; ++j) nan |= std::isnan(x[j]);
  return nan;
}

Candidates::Candidates(std::span<const std::int64_t> candidates)
    : tokens(candidates),
      increasing(increasing_in_key(candidates)),
      range(increasing && candidates.back() - candidates.front() == static_cast<std::int64_t>(candidates.size()) - 1) {}

void top_k(const float* scores, std::span<const std::int64_t> candidates, std::int64_t k,
           std::vector<std::int64_t>& kept) {
  top_k(scores, Candidates(candidates), k, kept);
}

void top_k(const float* scores, const Candidates& c, std::int64_t k, std::vector<std::int64_t>& kept) {
  const std::span<const std::int64_t> candidates = c.tokens;
  const auto n = static_cast<std::ptrdiff_t>(candidates.size());
  const auto kk = static_cast<std::ptrdiff_t>(std::clamp<std::int64_t>(k, 0, n));
  if (kk > 0 && kk < n && candidates.size() >= kRadixMin && c.increasing) {
    top_k_increasing(scores, c, static_cast<std::size_t>(kk), kept);
    return;
  }
  // A strict total order (score descending, then index ascending) makes the
  // kept set unique whatever the selection's internal order.
  if (!fits_in_key(candidates)) {
    kept.assign(candidates.begin(), candidates.end());
    const auto better = [scores](std::int64_t a, std::int64_t b) {
      return scores[a] != scores[b] ? scores[a] > scores[b] : a < b;
    };
    if (kk < n) std::nth_element(kept.begin(), kept.begin() + kk, kept.end(), better);
    kept.resize(static_cast<std::size_t>(kk));
    std::sort(kept.begin(), kept.end());
    return;
  }
  // The same order on packed 64-bit keys: no indirect loads in the comparisons.
  std::vector<std::uint64_t> keys(candidates.size());
  for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = selection_key(scores[candidates[i]], candidates[i]);
  kept.clear();
  if (kk == n) {
    kept.assign(candidates.begin(), candidates.end());
  } else if (kk > 0) {
    // Kept = keys up to the kk-th smallest; a pass in candidate order yields
    // them already sorted when the candidates are (the usual case). Branch-free:
    // about half the candidates are kept, in no predictable pattern.
    const std::uint64_t last = kth_smallest(keys, static_cast<std::size_t>(kk));
    kept.resize(candidates.size());
    std::size_t m = 0;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      kept[m] = candidates[i];
      m += keys[i] <= last ? 1 : 0;
    }
    kept.resize(m);
  }
  if (static_cast<std::ptrdiff_t>(kept.size()) != kk) {  // repeated candidates: take the k front keys
    std::nth_element(keys.begin(), keys.begin() + kk, keys.end());
    kept.resize(static_cast<std::size_t>(kk));
    for (std::size_t i = 0; i < kept.size(); ++i) kept[i] = static_cast<std::int64_t>(keys[i] & UINT32_MAX);
  }
  if (!std::is_sorted(kept.begin(), kept.end())) std::sort(kept.begin(), kept.end());
}

namespace {

/// a . b and b . b in one pass over d values, each row fp32 or storage
/// converted in registers (the same bits either way). Under AVX2
/// (d % 32 == 0) each dot is four eight-lane FMA chains summed in a fixed
/// order: one chain per dot left the cosine kernel compute-bound at a quarter
/// of the copy bandwidth. With `b_range`, also b's largest and least non-zero
/// |value| (abs_range's), taken from the same registers.
template <class SA, class SB>
void fused_dots(const SA* a, const SB* b, int d, float& ab, float& bb, float* b_range = nullptr) {
#if KVSCOPE_CPU_AVX2
  if (d % 32 == 0) {
    __m256 x[4], y[4];
    detail::AbsRange range;
    for (int l = 0; l < 4; ++l) x[l] = y[l] = _mm256_setzero_ps();
    for (int i = 0; i < d; i += 32)
      for (int u = 0; u < 4; ++u) {
        const __m256 va = detail::load8(a + i + 8 * u), vb = detail::load8(b + i + 8 * u);
        x[u] = _mm256_fmadd_ps(va, vb, x[u]);
        y[u] = _mm256_fmadd_ps(vb, vb, y[u]);
        if (b_range) range.add(vb);
      }
    ab = detail::hsum(_mm256_add_ps(_mm256_add_ps(x[0], x[1]), _mm256_add_ps(x[2], x[3])));
    bb = detail::hsum(_mm256_add_ps(_mm256_add_ps(y[0], y[1]), _mm256_add_ps(y[2], y[3])));
    if (b_range) {
      b_range[0] = range.high();
      b_range[1] = range.low();
    }
    return;
  }
#endif
  if constexpr (std::is_same_v<SA, float> && std::is_same_v<SB, float>) {
    ab = dot(a, b, d);
    bb = dot(b, b, d);
    if (b_range) b_range[0] = detail::abs_range(b, d, b_range[1]);
  } else {  // not reached: the cosine reads storage rows only under AVX2 with d % 32 == 0
    std::vector<float> fa(static_cast<std::size_t>(d)), fb(static_cast<std::size_t>(d));
    load_row(a, d, fa.data());
    load_row(b, d, fb.data());
    fused_dots(fa.data(), fb.data(), d, ab, bb, b_range);
  }
}

float squared_norm(const float* a, int d) {
  float aa = 0.0f, unused = 0.0f;
  fused_dots(a, a, d, unused, aa);
  return aa;
}

/// Significands below 2^-60 (bf16) or 2^-40 (fp32) make rescaling change bits
/// (detail::rescale_changes_no_bit); fp16 never needs the scale (load_scaled).
template <class S>
constexpr float kExactFloor = std::is_same_v<S, bf16> ? 0x1p-60f : 0x1p-40f;

/// Whether a row with |values| in [lo, hi] (lo the least non-zero) is used as
/// stored: its scale exponent is 0, or scaling it changes no bit of a cosine.
template <class S>
bool used_unscaled(float hi, float lo) {
  if constexpr (std::is_same_v<S, f16>) return true;
  return detail::rescale_changes_no_bit(math::scale_exponent(hi), lo, kExactFloor<S>);
}

/// Loads a key row as fp32, scaled by 2^-e (in two exact halves, e = its
/// scale exponent) so the squared norms of tiny keys do not underflow nor
/// those of huge keys overflow. A NaN anywhere makes the cosine NaN or 0
/// whatever the scale, so the max may ignore or keep it. Returns whether the
/// row was scaled.
template <class S>
bool load_scaled(const S* src, int d, float* row) {
  load_row(src, d, row);
  // fp16 needs no scaling: its squares and products (>= 2^-48 unless 0, sums
  // <= 2^39) stay normal in fp32, where a power-of-two scale commutes with
  // every rounding. The cosine is then the same bits with or without it.
  // Nor does a row whose scale changes no bit (typical keys).
  if constexpr (std::is_same_v<S, f16>) return false;
  float lo = 0.0f;
  const float hi = detail::abs_range(row, d, lo);
  if (used_unscaled<S>(hi, lo)) return false;
  const int e = math::scale_exponent(hi), h1 = -e / 2;
  const float f1 = detail::pow2(h1), f2 = detail::pow2(-e - h1);  // |h| <= 74
#pragma omp simd
  for (int i = 0; i < d; ++i) row[i] = row[i] * f1 * f2;
  return true;
}

#if KVSCOPE_CPU_AVX512
KVSCOPE_AVX512_WARNINGS_OFF
/// The cosines of pairs [j, j1) of one head's rows kh (d = 16 * kBlocks),
/// with row j's squared norm in `na`, while every row is used as stored:
/// each row is converted once and kept in registers as the next pair's
/// first row (the AVX2 loop converts each row twice, and a stored fp32 row
/// costs more than converting it again). The blocks of sixteen lanes hold
/// fused_dots' chains in pairs, in the same order, so the same bits. Returns
/// the first pair not done: j1, or the pair whose second row needs its scale.
template <int kBlocks, class S>
std::int64_t cosines_in_registers(const S* kh, std::int64_t j, std::int64_t j1, float& na, float* out) {
  constexpr int d = 16 * kBlocks;
  __m512 a[kBlocks];
  for (int k = 0; k < kBlocks; ++k) a[k] = detail::load16(kh + j * d + 16 * k);
  for (; j < j1; ++j) {
    const S* next = kh + (j + 1) * d;
    prefetch(reinterpret_cast<const char*>(next) + kPrefetchAhead, d * sizeof(S));
    __m512 b[kBlocks];
    __m512 x[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, y[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    detail::AbsRange16 range;  // what used_unscaled needs (fp16 rows always are)
    for (int k = 0; k < kBlocks; ++k) {
      b[k] = detail::load16(next + 16 * k);
      x[k % 2] = _mm512_fmadd_ps(a[k], b[k], x[k % 2]);
      y[k % 2] = _mm512_fmadd_ps(b[k], b[k], y[k % 2]);
      if constexpr (!std::is_same_v<S, f16>) range.add(b[k]);
    }
    if constexpr (!std::is_same_v<S, f16>) {
      const detail::AbsRange r = range.fold();
      if (!used_unscaled<S>(r.high(), r.low())) return j;
    }
    const float nb = detail::sum_of_chains(y[0], y[1]);
    out[j] = math::cosine(detail::sum_of_chains(x[0], x[1]), na, nb);
    na = nb;
    for (int k = 0; k < kBlocks; ++k) a[k] = b[k];
  }
  return j;
}

/// cosines_in_registers for this d, or j (nothing done) where d has no
/// register-resident version.
template <class S>
std::int64_t cosines_in_registers(const S* kh, int d, std::int64_t j, std::int64_t j1, float& na, float* out) {
  switch (d) {
    case 32: return cosines_in_registers<2>(kh, j, j1, na, out);
    case 64: return cosines_in_registers<4>(kh, j, j1, na, out);
    case 128: return cosines_in_registers<8>(kh, j, j1, na, out);
    default: return j;
  }
}
KVSCOPE_AVX512_WARNINGS_ON
#endif

// Pairs per work item: each item loads one row more than it has pairs.
constexpr std::int64_t kPairsPerItem = 256;

}  // namespace

template <class S>
void adjacent_key_cosine(const LayerShape& s, const S* k, float* out) {
  const std::int64_t T = s.tokens, pairs = T - 1;
  const int d = s.head_dim;
  if (T < 2) return;
  const std::int64_t per_head = (pairs + kPairsPerItem - 1) / kPairsPerItem;
#pragma omp parallel
  {
    std::vector<float> a(static_cast<std::size_t>(d)), b(static_cast<std::size_t>(d));
#pragma omp for schedule(static)
    for (std::int64_t item = 0; item < s.kv_heads * per_head; ++item) {
      const std::int64_t h = item / per_head, j0 = item % per_head * kPairsPerItem;
      const std::int64_t j1 = std::min(j0 + kPairsPerItem, pairs);
      const S* kh = k + h * T * d;
      // Row j + 1 of pair j is row j of pair j + 1: each row is converted
      // (and scaled) once. While both rows of a pair are used as stored (the
      // common case), the dots read them straight from storage and take the
      // new row's range on the way; a row that needs its scale goes through
      // the fp32 buffers, in the same arithmetic, so the same bits either way.
      bool a_scaled = load_scaled(kh + j0 * d, d, a.data());
      float na = squared_norm(a.data(), d);
      [[maybe_unused]] bool a_in_buffer = true;
      std::int64_t j = j0;
#if KVSCOPE_CPU_AVX512
      if (!a_scaled) {  // row j0 as stored: the pairs in registers until a row needs its scale
        j = cosines_in_registers(kh, d, j0, j1, na, out + h * pairs);
        a_in_buffer = j == j0;  // else row j (unscaled) is only in storage
      }
#endif
      for (; j < j1; ++j) {
        const S* next = kh + (j + 1) * d;
        prefetch(reinterpret_cast<const char*>(next) + kPrefetchAhead, d * sizeof(S));
        float ab = 0.0f, nb = 0.0f;
#if KVSCOPE_CPU_AVX2
        if (!a_scaled && d % 32 == 0) {
          float range[2] = {0.0f, 0.0f};
          fused_dots(next - d, next, d, ab, nb, std::is_same_v<S, f16> ? nullptr : range);
          if (used_unscaled<S>(range[0], range[1])) {
            out[h * pairs + j] = math::cosine(ab, na, nb);
            na = nb;
            a_in_buffer = false;
            continue;
          }
          if (!a_in_buffer) load_row(next - d, d, a.data());  // unscaled row j
        }
#endif
        const bool b_scaled = load_scaled(next, d, b.data());
        fused_dots(a.data(), b.data(), d, ab, nb);
        out[h * pairs + j] = math::cosine(ab, na, nb);
        std::swap(a, b);
        na = nb;
        a_scaled = b_scaled;
        a_in_buffer = true;
      }
    }
  }
}

#define KVSCOPE_SELECT(S) template void adjacent_key_cosine<S>(const LayerShape&, const S*, float*);
KVSCOPE_CPU_INSTANTIATE(KVSCOPE_SELECT)

}  // namespace kvscope::opt::cpu
