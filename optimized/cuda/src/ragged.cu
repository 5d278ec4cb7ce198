// The ragged (varlen) cache: building it from a CSR plan and single-query
// decode attention over it (cpu counterparts: optimized/cpu/src/ragged.cpp).
// Both kernels are memory-bound; their layouts are chosen for bytes in flight.
#include <cuda_pipeline.h>

#include <cmath>
#include <string>

#include "common.cuh"
#include "kvscope/core/kernel_math.hpp"
#include "kvscope/opt/cuda/kernels.hpp"

namespace kvscope::opt::cuda {
namespace {

using detail::kVec;
using detail::load;
using detail::load_n;
using detail::store_n;

/// The kv head whose slots hold global slot r: the last h with offsets[h] <= r.
__device__ __forceinline__ int head_of_slot(const std::int64_t* offsets, int heads, std::int64_t r) {
  int lo = 0, hi = heads - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r) lo = mid; else hi = mid - 1;
  }
  return lo;
}

/// acc = (first ? 0 : acc) + c * x over N lanes; starting from the first term
/// (not from 0 + term) keeps a kept token's -0 as the CPU's bit copy does.
template <int N>
__device__ __forceinline__ void accumulate(float* acc, float c, const float* x, bool first) {
#pragma unroll
  for (int u = 0; u < N; ++u) acc[u] = first ? c * x[u] : acc[u] + c * x[u];
}

/// Adds c times one entry's row `row` to a thread's piece: elements [lo, lo + N)
/// and [hi, hi + N) when paired, else the single element lo.
template <class S, int N>
__device__ __forceinline__ void add_entry(const S* row, bool paired, int lo, int hi, float c, float* acc_lo,
                                          float* acc_hi, bool& first) {
  float x[N];
  if (paired) {
    load_n<S, N>(row + lo, x);
    accumulate<N>(acc_lo, c, x, first);
    load_n<S, N>(row + hi, x);
    accumulate<N>(acc_hi, c, x, first);
  } else {
    x[0] = load(row, lo);
    accumulate<1>(acc_lo, c, x, first);
  }
  first = false;
}

/// One thread per (slot, pair of N-element pieces): elements [i, i + N) and
/// [i + half, i + half + N) of the slot's K' and V' rows, so each RoPE pair
/// (i, i + d/2) is in one thread. N = kVec<S> (16-byte loads) when d/2 is a
/// multiple of it and the rows are aligned, else 1. For odd d the last
/// element, which RoPE leaves alone, is the piece `pieces - 1` with no partner.
template <class S, int N>
__global__ void ragged_rows(RaggedPlan plan, std::int64_t slots, const S* k, const S* v, std::int64_t tokens, int d,
                            S* k_out, S* v_out) {
  const int half = d / 2, pairs = half / N, pieces = pairs + (d % 2);
  const std::int64_t item = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= slots * pieces) return;
  const std::int64_t r = item / pieces;
  const int piece = static_cast<int>(item % pieces);
  const bool paired = piece < pairs;
  const int lo = paired ? piece * N : d - 1, hi = lo + half;  // hi only when paired
  const int h = head_of_slot(plan.offsets, plan.heads, r);
  const S* kh = k + static_cast<std::int64_t>(h) * tokens * d;
  const S* vh = v + static_cast<std::int64_t>(h) * tokens * d;
  // K and V together: four 16-byte loads in flight per entry (measured faster
  // on an H200 than K then V, despite the registers).
  float klo[N], khi[N], vlo[N], vhi[N];
#pragma unroll
  for (int u = 0; u < N; ++u) klo[u] = khi[u] = vlo[u] = vhi[u] = 0.0f;
  bool k_first = true, v_first = true;
  for (std::int64_t e = plan.row_ptr[r]; e < plan.row_ptr[r + 1]; ++e) {
    const std::int64_t at = plan.token[e] * d;
    const float ck = plan.coef_k[e], cv = plan.coef_v[e];
    if (ck != 0.0f) add_entry<S, N>(kh + at, paired, lo, hi, ck, klo, khi, k_first);
    if (cv != 0.0f) add_entry<S, N>(vh + at, paired, lo, hi, cv, vlo, vhi, v_first);
  }
  S* ko = k_out + r * d;
  S* vo = v_out + r * d;
  if (!paired) {
    ko[lo] = detail::store_as<S>(klo[0]);
    vo[lo] = detail::store_as<S>(vlo[0]);
    return;
  }
  if (plan.rotate != nullptr && plan.rotate[r] != 0)
#pragma unroll
    for (int u = 0; u < N; ++u)
      math::rope_rotate_pair(klo[u], khi[u], lo + u, d, static_cast<double>(plan.rotate[r]), plan.rope_theta);
  store_n<S, N>(klo, ko + lo);
  store_n<S, N>(khi, ko + hi);
  store_n<S, N>(vlo, vo + lo);
  store_n<S, N>(vhi, vo + hi);
}

// Decode attention, flash-decoding style: the slots are cut into chunks of
// kChunk consecutive global slots; a block attends one chunk (a chunk that
// straddles kv heads is one segment per head) for all G q heads of the head,
// writing a partial (max, normaliser, unnormalised output); a second kernel
// merges each q head's chunks in order. Fixed orders throughout: the same
// bits on every run. The kernel is memory-bound, so bytes in flight rule: the
// chunk's V rows are copied to shared memory asynchronously (cp.async) at the
// start, while each thread reads its slot's K row in 16-byte loads. Measured
// on an H200 (docs/performance.md): 128-slot chunks with a thread per slot
// beat 32-slot chunks with four lanes per slot (38 vs 52 us).
constexpr int kChunk = 128, kDecodeThreads = 128, kDecodeWarps = kDecodeThreads / 32;
constexpr int kHeadsPerPass = 8;  // q heads whose accumulators a thread holds at once

/// 16-byte pieces per K/V row when the vector path applies (d * sizeof(S) a
/// multiple of 16, at most kDecodeThreads pieces, aligned rows), else 0.
template <class S>
int decode_pieces(int d, const void* k, const void* v) {
  const int pieces = d / kVec<S>;
  return d % kVec<S> == 0 && pieces <= kDecodeThreads && detail::aligned(16, {k, v}) ? pieces : 0;
}

/// Shared memory of decode_chunks, in floats then bytes: G scaled queries,
/// G x kChunk logits, the slot groups' partial outputs for one pass of heads,
/// then (when `staged`) the chunk's V rows in storage type.
struct DecodeShared {
  std::size_t floats = 0, v_bytes = 0;
  std::size_t bytes() const { return floats * sizeof(float) + v_bytes; }
};
DecodeShared decode_shared(int G, int d, int pieces, std::size_t elem, bool staged) {
  const int groups = pieces > 0 ? kDecodeThreads / pieces : 0, pass = G < kHeadsPerPass ? G : kHeadsPerPass;
  DecodeShared sh;
  sh.floats = static_cast<std::size_t>(G) * (d + kChunk) + static_cast<std::size_t>(groups) * pass * d;
  sh.floats = (sh.floats + 3) / 4 * 4;  // the V rows start 16-byte aligned
  sh.v_bytes = staged ? static_cast<std::size_t>(kChunk) * d * elem : 0;
  return sh;
}

template <class S>
__global__ void decode_chunks(const float* q, int kv_heads, int G, int d, const std::int64_t* offsets,
                              std::int64_t total, const S* k, const S* v, const float* log_bias, int pieces,
                              std::size_t v_offset /* floats before the staged V rows; 0: not staged */,
                              float* part_ml /* [chunks, q_heads, 2] */, float* part_acc /* [chunks, q_heads, d] */) {
  extern __shared__ __align__(16) float smem[];
  float* qs = smem;                                       // [G, d]
  float* x = qs + static_cast<std::size_t>(G) * d;        // [G, kChunk]: logits, then weights
  float* red = x + static_cast<std::size_t>(G) * kChunk;  // [groups, pass, d]
  S* vs = v_offset > 0 ? reinterpret_cast<S*>(smem + v_offset) : nullptr;  // [kChunk, d]
  constexpr int V = kVec<S>;
  const int t = static_cast<int>(threadIdx.x), warp = t / 32, lane = t % 32;
  const int q_heads = kv_heads * G, pass = G < kHeadsPerPass ? G : kHeadsPerPass;
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  const std::int64_t c = blockIdx.x, c0 = c * kChunk, c1 = c0 + kChunk < total ? c0 + kChunk : total;

  for (int g = head_of_slot(offsets, kv_heads, c0); g < kv_heads && offsets[g] < c1; ++g) {
    const std::int64_t a = offsets[g] > c0 ? offsets[g] : c0, b = offsets[g + 1] < c1 ? offsets[g + 1] : c1;
    if (a >= b) continue;  // an empty head inside the chunk
    const int n = static_cast<int>(b - a);
    const std::int64_t part = c * q_heads + static_cast<std::int64_t>(g) * G;  // partial of this group's first q head
    __syncthreads();  // the previous segment is done with the shared arrays
    if (vs != nullptr) {  // the segment's V rows -> shared, in flight while the logits are computed
      const std::int64_t pieces16 = static_cast<std::int64_t>(n) * d / V;
      for (std::int64_t i = t; i < pieces16; i += kDecodeThreads)
        __pipeline_memcpy_async(vs + i * V, v + a * d + i * V, 16);
      __pipeline_commit();
    }
    for (int i = t; i < G * d; i += kDecodeThreads) qs[i] = q[static_cast<std::int64_t>(g) * G * d + i] * scale;
    __syncthreads();
    // Logits: a thread per slot; its K row in 16-byte loads, up to kHeadsPerPass dots at once.
    if (t < n) {
      const S* krow = k + (a + t) * d;
      const float bias = log_bias != nullptr ? log_bias[a + t] : 0.0f;
      for (int h0 = 0; h0 < G; h0 += kHeadsPerPass) {
        float dot[kHeadsPerPass] = {};
        if (pieces > 0) {
#pragma unroll 4
          for (int i = 0; i < d; i += V) {
            float kx[V];
            load_n<S, V>(krow + i, kx);
#pragma unroll
            for (int hh = 0; hh < kHeadsPerPass; ++hh)
              if (h0 + hh < G)
#pragma unroll
                for (int u = 0; u < V; ++u) dot[hh] += qs[(h0 + hh) * d + i + u] * kx[u];
          }
        } else {
          for (int i = 0; i < d; ++i) {
            const float kx = load(krow, i);
#pragma unroll
            for (int hh = 0; hh < kHeadsPerPass; ++hh)
              if (h0 + hh < G) dot[hh] += qs[(h0 + hh) * d + i] * kx;
          }
        }
#pragma unroll
        for (int hh = 0; hh < kHeadsPerPass; ++hh)
          if (h0 + hh < G) x[(h0 + hh) * kChunk + t] = dot[hh] + bias;
      }
    }
    __syncthreads();
    // Per q head (a warp each, in turn): the segment's max and normaliser; logits become weights.
    for (int h = warp; h < G; h += kDecodeWarps) {
      float m = -INFINITY;
      for (int s = lane; s < n; s += 32) m = fmaxf(m, x[h * kChunk + s]);
      m = detail::warp_max(m);
      float l = 0.0f;
      for (int s = lane; s < n; s += 32) {
        const float p = m == -INFINITY ? 0.0f : expf(x[h * kChunk + s] - m);  // every logit -inf: no weight
        x[h * kChunk + s] = p;
        l += p;
      }
      l = detail::warp_sum(l);
      if (lane == 0) {
        part_ml[(part + h) * 2] = m;
        part_ml[(part + h) * 2 + 1] = l;
      }
    }
    if (vs != nullptr) __pipeline_wait_prior(0);
    __syncthreads();  // weights written; V rows landed
    // Unnormalised outputs sum_s w[h, s] v[s, :].
    if (pieces > 0) {
      // Thread = (slot group, 16-byte piece): slots group, group + groups, ... in order; then
      // the groups' sums are added in group order through shared memory.
      const S* vrows = vs != nullptr ? vs : v + a * d;
      const int groups = kDecodeThreads / pieces, grp = t / pieces, piece = t % pieces;
      for (int h0 = 0; h0 < G; h0 += kHeadsPerPass) {
        if (grp < groups) {
          float acc[kHeadsPerPass][V] = {};
#pragma unroll 2
          for (int s = grp; s < n; s += groups) {
            float vx[V];
            load_n<S, V>(vrows + static_cast<std::int64_t>(s) * d + piece * V, vx);
#pragma unroll
            for (int hh = 0; hh < kHeadsPerPass; ++hh)
              if (h0 + hh < G) {
                const float w = x[(h0 + hh) * kChunk + s];
#pragma unroll
                for (int u = 0; u < V; ++u) acc[hh][u] += w * vx[u];
              }
          }
#pragma unroll
          for (int hh = 0; hh < kHeadsPerPass; ++hh)
#pragma unroll
            for (int u = 0; u < V; ++u)
              if (hh < pass) red[(grp * pass + hh) * d + piece * V + u] = acc[hh][u];
        }
        __syncthreads();
        const int hn = G - h0 < pass ? G - h0 : pass;
        for (int e = t; e < hn * d; e += kDecodeThreads) {
          const int hh = e / d, i = e % d;
          float sum = 0.0f;
          for (int gi = 0; gi < groups; ++gi) sum += red[(gi * pass + hh) * d + i];
          part_acc[(part + h0 + hh) * d + i] = sum;
        }
        __syncthreads();
      }
    } else {
      for (int e = t; e < G * d; e += kDecodeThreads) {
        const int h = e / d, i = e % d;
        float acc = 0.0f;
        for (int s = 0; s < n; ++s) acc += x[h * kChunk + s] * load(v, (a + s) * d + i);
        part_acc[(part + h) * d + i] = acc;
      }
    }
  }
}

/// One block per q head: merges the partials of its kv head's chunks in chunk order.
__global__ void decode_merge(int G, int d, const std::int64_t* offsets, const float* part_ml, const float* part_acc,
                             int q_heads, float* out) {
  const int h = blockIdx.x, g = h / G;
  const std::int64_t a = offsets[g], b = offsets[g + 1];
  float* o = out + static_cast<std::int64_t>(h) * d;
  if (a >= b) {  // no slots: nothing to attend to
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = 0.0f;
    return;
  }
  const std::int64_t first = a / kChunk, last = (b - 1) / kChunk;
  float M = -INFINITY;
  for (std::int64_t c = first; c <= last; ++c) M = fmaxf(M, part_ml[(c * q_heads + h) * 2]);
  // A chunk's factor e^(m_c - M); 0 for a chunk whose logits were all -inf (as merge_partials on the CPU).
  auto factor = [&](std::int64_t c) {
    const float m = part_ml[(c * q_heads + h) * 2];
    return m == -INFINITY ? 0.0f : expf(m - M);
  };
  float L = 0.0f;
  for (std::int64_t c = first; c <= last; ++c) L += part_ml[(c * q_heads + h) * 2 + 1] * factor(c);
  const float inv = L > 0.0f ? 1.0f / L : 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float acc = 0.0f;
    for (std::int64_t c = first; c <= last; ++c) acc += part_acc[(c * q_heads + h) * d + i] * factor(c);
    o[i] = acc * inv;
  }
}

template <class S>
void launch_ragged(const RaggedPlan& plan, std::int64_t slots, const S* k, const S* v, std::int64_t tokens, int d,
                   S* k_out, S* v_out, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const bool vec = (d / 2) % kVec<S> == 0 && d % 2 == 0 && detail::aligned(16, {k, v, k_out, v_out});
  if (vec) {
    const std::int64_t items = slots * (d / 2 / kVec<S>);
    ragged_rows<S, kVec<S>><<<detail::grid_for(items, kThreads), kThreads, 0, stream>>>(plan, slots, k, v, tokens, d,
                                                                                        k_out, v_out);
  } else {
    const std::int64_t items = slots * (d / 2 + d % 2);
    ragged_rows<S, 1><<<detail::grid_for(items, kThreads), kThreads, 0, stream>>>(plan, slots, k, v, tokens, d, k_out,
                                                                                 v_out);
  }
}

}  // namespace

void apply_ragged_plan(const RaggedPlan& plan, std::int64_t slots, DType dtype, const void* k, const void* v,
                       std::int64_t tokens, int head_dim, void* k_out, void* v_out, Stream stream) {
  if (slots <= 0 || head_dim <= 0) return;
  detail::dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    launch_ragged(plan, slots, static_cast<const S*>(k), static_cast<const S*>(v), tokens, head_dim,
                  static_cast<S*>(k_out), static_cast<S*>(v_out), stream);
  });
  KVSCOPE_CUDA_LAUNCHED("ragged_rows");
}

void decode_attention(const float* q, int q_heads, int kv_heads, int head_dim, const std::int64_t* offsets,
                      std::int64_t total_slots, DType dtype, const void* k, const void* v, const float* log_bias,
                      float* out, Stream stream) {
  if (q_heads == 0) return;
  const int G = q_heads / kv_heads, d = head_dim;
  const std::int64_t chunks = (total_slots + kChunk - 1) / kChunk;
  // At least one chunk's partials, so decode_merge's pointers are valid when there are no slots.
  detail::Scratch<float> ml(std::max<std::int64_t>(chunks, 1) * q_heads * 2, stream),
      acc(std::max<std::int64_t>(chunks, 1) * q_heads * d, stream);
  detail::dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    if (chunks == 0) return;
    const int pieces = decode_pieces<S>(d, k, v);
    // Stage V in shared memory when the vector path applies and it fits the device's opt-in limit.
    const int optin = detail::shared_optin_bytes();
    DecodeShared sh = decode_shared(G, d, pieces, sizeof(S), pieces > 0);
    if (sh.bytes() > static_cast<std::size_t>(optin)) sh = decode_shared(G, d, pieces, sizeof(S), false);
    if (sh.bytes() > static_cast<std::size_t>(optin))
      throw Error(ErrorKind::kUsage, "decode_attention: head_dim " + std::to_string(d) + " with " +
                                                   std::to_string(G) + " q heads per kv head needs " +
                                                   std::to_string(sh.bytes()) + " bytes of shared memory, over the "
                                                   "device's " + std::to_string(optin));
    detail::allow_dynamic_shared(decode_chunks<S>, sh.bytes(), 0,
                                 "decode_attention: shared memory for this head_dim and group size");
    decode_chunks<S><<<static_cast<unsigned>(chunks), kDecodeThreads, sh.bytes(), stream>>>(
        q, kv_heads, G, d, offsets, total_slots, static_cast<const S*>(k), static_cast<const S*>(v), log_bias, pieces,
        sh.v_bytes > 0 ? sh.floats : 0, ml.get(), acc.get());
    KVSCOPE_CUDA_LAUNCHED("decode_chunks");
  });
  decode_merge<<<static_cast<unsigned>(q_heads), 128, 0, stream>>>(G, d, offsets, ml.get(), acc.get(), q_heads, out);
  KVSCOPE_CUDA_LAUNCHED("decode_merge");
}

}  // namespace kvscope::opt::cuda
