// Selection kernels (cpu counterparts: optimized/cpu/src/select.cpp and the
// backend's top_k): segmented exact top-k by radix select (the row's keys
// staged in shared memory), adjacent-key cosine, and merge-set segmentation
// by a max-scan.
#include <cstdint>

#include "common.cuh"
#include "kvscope/core/kernel_math.hpp"
#include "kvscope/opt/cuda/kernels.hpp"

namespace kvscope::opt::cuda {
namespace {

using detail::kBlock;
using detail::load;

/// High half of the order key of (score, index): smaller = better (higher
/// score), one total order like cpu::top_k's with the index as the low half.
/// -0 is +0. 0xffffffff (a NaN's key) marks a token that is not a candidate.
__device__ __forceinline__ unsigned score_key(float score) {
  if (score == 0.0f) score = 0.0f;
  const unsigned u = __float_as_uint(score);
  return ~((u & 0x80000000u) ? ~u : (u | 0x80000000u));  // ~(ascending float order as unsigned)
}
constexpr unsigned kNotCandidate = 0xffffffffu;

constexpr int kTopKThreads = 1024;

/// One block per row: finds the k-th smallest order key (score_key, index)
/// among the candidates by 8 passes of an 8-bit radix histogram (counts are
/// order-free: exact and deterministic), then marks every candidate at or
/// below it. With kStaged the row's score keys are computed once into shared
/// memory and the passes read them there; otherwise each pass recomputes them
/// from global memory (rows too long for shared memory).
template <bool kStaged>
__global__ void __launch_bounds__(kTopKThreads) top_k_rows(const float* scores, const std::uint8_t* candidate,
                                                           std::int64_t n, const std::int64_t* k, std::uint8_t* kept) {
  extern __shared__ unsigned staged[];  // n score keys when kStaged
  __shared__ unsigned hist[256];
  __shared__ unsigned long long prefix;  // digits fixed so far (high bits)
  __shared__ long long remaining;        // rank still to find inside the prefix
  __shared__ unsigned long long count;
  const int t = static_cast<int>(threadIdx.x);
  const std::int64_t row = blockIdx.x;
  const float* s = scores + row * n;
  const std::uint8_t* cand = candidate ? candidate + row * n : nullptr;
  std::uint8_t* out = kept + row * n;
  const auto key_hi = [&](std::int64_t j) -> unsigned {
    if (kStaged) return staged[j];
    return cand && !cand[j] ? kNotCandidate : score_key(s[j]);
  };

  if (t == 0) count = 0;
  __syncthreads();
  unsigned long long mine = 0;
  for (std::int64_t j = t; j < n; j += kTopKThreads) {
    const unsigned h = cand && !cand[j] ? kNotCandidate : score_key(s[j]);
    if (kStaged) staged[j] = h;
    mine += h != kNotCandidate ? 1 : 0;
  }
  atomicAdd(&count, mine);
  __syncthreads();
  const long long want = k[row] < 0 ? 0 : k[row];
  if (want >= static_cast<long long>(count) || want == 0) {  // all or none of the candidates
    for (std::int64_t j = t; j < n; j += kTopKThreads) out[j] = want > 0 && key_hi(j) != kNotCandidate ? 1 : 0;
    return;
  }
  if (t == 0) {
    prefix = 0;
    remaining = want;  // 1-based rank of the threshold key
  }
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = t; b < 256; b += kTopKThreads) hist[b] = 0;
    __syncthreads();
    const unsigned long long high_mask = shift == 56 ? 0ull : (~0ull << (shift + 8)), want_high = prefix;
    for (std::int64_t j = t; j < n; j += kTopKThreads) {
      const unsigned h = key_hi(j);
      if (h == kNotCandidate) continue;
      const unsigned long long key = (static_cast<unsigned long long>(h) << 32) | static_cast<unsigned>(j);
      if ((key & high_mask) == want_high) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
    }
    __syncthreads();
    if (t < 32) {  // the digit holding rank `remaining`: a warp scan over 8 bins per lane
      unsigned c[8], sum = 0;
#pragma unroll
      for (int u = 0; u < 8; ++u) sum += (c[u] = hist[t * 8 + u]);
      unsigned incl = sum;
      for (int o = 1; o < 32; o *= 2) {
        const unsigned y = __shfl_up_sync(0xffffffffu, incl, o);
        if (t >= o) incl += y;
      }
      const long long rank = remaining;
      const unsigned reach = __ballot_sync(0xffffffffu, static_cast<long long>(incl) >= rank);
      if (t == __ffs(reach) - 1) {
        long long left = rank - static_cast<long long>(incl - sum);
        int digit = t * 8;
        for (int u = 0; u < 8 && left > static_cast<long long>(c[u]); ++u, ++digit) left -= c[u];
        prefix = want_high | (static_cast<unsigned long long>(digit) << shift);
        remaining = left;
      }
    }
    __syncthreads();
  }
  const unsigned long long threshold = prefix;  // keys are unique: exactly `want` keys are <= it
  for (std::int64_t j = t; j < n; j += kTopKThreads) {
    const unsigned h = key_hi(j);
    out[j] = h != kNotCandidate &&
                     ((static_cast<unsigned long long>(h) << 32) | static_cast<unsigned>(j)) <= threshold
                 ? 1
                 : 0;
  }
}

template <class S>
__global__ void adjacent_cosine(const S* k, int heads, std::int64_t T, int d, float* out) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= static_cast<std::int64_t>(heads) * (T - 1)) return;
  const std::int64_t h = r / (T - 1), j = r % (T - 1);
  const S* a = k + (h * T + j) * d;
  const S* b = a + d;
  // As the CPU kernel: each key scaled by a power of two (exact) so tiny keys keep their norms.
  float ma = 0.0f, mb = 0.0f;
  for (int i = 0; i < d; ++i) {
    ma = fmaxf(ma, fabsf(load(a, i)));
    mb = fmaxf(mb, fabsf(load(b, i)));
  }
  const int ea = math::scale_exponent(ma), eb = math::scale_exponent(mb);
  const float fa1 = ldexpf(1.0f, -ea / 2), fa2 = ldexpf(1.0f, -ea - (-ea / 2));
  const float fb1 = ldexpf(1.0f, -eb / 2), fb2 = ldexpf(1.0f, -eb - (-eb / 2));
  float ab = 0.0f, aa = 0.0f, bb = 0.0f;
  for (int i = 0; i < d; ++i) {
    const float x = ea != 0 ? load(a, i) * fa1 * fa2 : load(a, i);
    const float y = eb != 0 ? load(b, i) * fb1 * fb2 : load(b, i);
    ab += x * y;
    aa += x * x;
    bb += y * y;
  }
  out[r] = math::cosine(ab, aa, bb);
}

/// One block per row: segment[j] = the first token of j's merge set, a max-scan
/// of (j if j starts a set else 0) in tiles of kBlock with a carry.
__global__ void segment_rows(const float* sim, std::int64_t n, float threshold, std::int64_t* segment) {
  __shared__ long long tile[kBlock];
  __shared__ long long carry;
  const std::int64_t row = blockIdx.x;
  const float* sr = sim + row * (n - 1);
  std::int64_t* out = segment + row * n;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (std::int64_t base = 0; base < n; base += kBlock) {
    const std::int64_t j = base + threadIdx.x;
    const bool starts = j < n && (j == 0 || !(sr[j - 1] > threshold));
    tile[threadIdx.x] = starts ? j : 0;
    __syncthreads();
    for (int off = 1; off < kBlock; off *= 2) {  // Hillis-Steele inclusive max-scan
      const long long other = static_cast<int>(threadIdx.x) >= off ? tile[threadIdx.x - off] : 0;
      __syncthreads();
      if (other > tile[threadIdx.x]) tile[threadIdx.x] = other;
      __syncthreads();
    }
    const long long v = tile[threadIdx.x] > carry ? tile[threadIdx.x] : carry;
    if (j < n) out[j] = v;
    __syncthreads();
    if (threadIdx.x == kBlock - 1) carry = v;
    __syncthreads();
  }
}

}  // namespace

void top_k_mask(const float* scores, const std::uint8_t* candidate, int rows, std::int64_t n, const std::int64_t* k,
                std::uint8_t* kept, Stream stream) {
  if (rows == 0 || n == 0) return;
  // Stage the row's keys in shared memory when they fit the device's opt-in limit (~56k tokens on sm_90).
  const std::size_t staged = static_cast<std::size_t>(n) * sizeof(unsigned);
  constexpr std::size_t kStatic = 4096;  // hist and the scalars, with room
  if (staged + kStatic <= static_cast<std::size_t>(detail::shared_optin_bytes())) {
    detail::allow_dynamic_shared(top_k_rows<true>, staged, kStatic, "top_k_mask: shared memory for the staged row");
    top_k_rows<true><<<static_cast<unsigned>(rows), kTopKThreads, staged, stream>>>(scores, candidate, n, k, kept);
  } else {
    top_k_rows<false><<<static_cast<unsigned>(rows), kTopKThreads, 0, stream>>>(scores, candidate, n, k, kept);
  }
  KVSCOPE_CUDA_LAUNCHED("top_k_rows");
}

void adjacent_key_cosine(const LayerShape& s, DType dtype, const void* k, float* out, Stream stream) {
  const std::int64_t T = s.tokens;
  if (T < 2) return;
  const std::int64_t total = static_cast<std::int64_t>(s.kv_heads) * (T - 1);
  detail::dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    adjacent_cosine<S><<<detail::grid_for(total, kBlock), kBlock, 0, stream>>>(static_cast<const S*>(k), s.kv_heads, T,
                                                                              s.head_dim, out);
  });
  KVSCOPE_CUDA_LAUNCHED("adjacent_cosine");
}

void merge_segments(const float* sim, int rows, std::int64_t n, float threshold, std::int64_t* segment,
                    Stream stream) {
  if (rows == 0 || n == 0) return;
  segment_rows<<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(sim, n, threshold, segment);
  KVSCOPE_CUDA_LAUNCHED("segment_rows");
}

}  // namespace kvscope::opt::cuda
