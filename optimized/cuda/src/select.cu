// Selection kernels (cpu counterparts: optimized/cpu/src/select.cpp and the
// backend's top_k): segmented exact top-k by radix select, adjacent-key
// cosine, and merge-set segmentation by a max-scan.
#include <cstdint>

#include "common.cuh"
#include "kvscope/core/kernel_math.hpp"
#include "kvscope/opt/cuda/kernels.hpp"

namespace kvscope::opt::cuda {
namespace {

using detail::kBlock;
using detail::load;

/// The order key of (score, index): smaller key = better (higher score; on
/// equal scores the lower index), one total order like cpu::top_k's. -0 is +0.
__device__ __forceinline__ unsigned long long order_key(float score, std::int64_t j) {
  if (score == 0.0f) score = 0.0f;
  unsigned u = __float_as_uint(score);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending float order as unsigned
  return (static_cast<unsigned long long>(~u) << 32) | static_cast<unsigned long long>(j);
}

/// One block per row: finds the k-th smallest order key among the candidates
/// (8 passes of an 8-bit radix histogram; counts are order-free, so exact and
/// deterministic), then marks every candidate at or below it.
__global__ void top_k_rows(const float* scores, const std::uint8_t* candidate, std::int64_t n, const std::int64_t* k,
                           std::uint8_t* kept) {
  __shared__ unsigned long long hist[256];
  __shared__ unsigned long long prefix;  // digits fixed so far (high bits)
  __shared__ long long remaining;        // rank still to find inside the prefix
  __shared__ long long count;
  const std::int64_t row = blockIdx.x;
  const float* s = scores + row * n;
  const std::uint8_t* cand = candidate ? candidate + row * n : nullptr;
  std::uint8_t* out = kept + row * n;

  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  long long mine = 0;
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) mine += (!cand || cand[j]) ? 1 : 0;
  atomicAdd(reinterpret_cast<unsigned long long*>(&count), static_cast<unsigned long long>(mine));
  __syncthreads();
  const long long want = k[row] < 0 ? 0 : k[row];
  if (want >= count || want == 0) {  // all or none of the candidates
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) out[j] = (want > 0 && (!cand || cand[j])) ? 1 : 0;
    return;
  }
  if (threadIdx.x == 0) {
    prefix = 0;
    remaining = want;  // 1-based rank of the threshold key
  }
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    const unsigned long long high_mask = shift == 56 ? 0ull : (~0ull << (shift + 8));
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      if (cand && !cand[j]) continue;
      const unsigned long long key = order_key(s[j], j);
      if ((key & high_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1ull);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long left = remaining;
      int digit = 0;
      for (; digit < 256; ++digit) {
        if (left <= static_cast<long long>(hist[digit])) break;
        left -= static_cast<long long>(hist[digit]);
      }
      prefix |= static_cast<unsigned long long>(digit) << shift;
      remaining = left;
    }
    __syncthreads();
  }
  const unsigned long long threshold = prefix;  // keys are unique: exactly `want` keys are <= it
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x)
    out[j] = ((!cand || cand[j]) && order_key(s[j], j) <= threshold) ? 1 : 0;
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
  top_k_rows<<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(scores, candidate, n, k, kept);
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
