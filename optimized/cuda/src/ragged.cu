// The ragged (varlen) cache: building it from a CSR plan and single-query
// decode attention over it (cpu counterparts: optimized/cpu/src/ragged.cpp).
#include <cmath>

#include "common.cuh"
#include "kvscope/core/kernel_math.hpp"
#include "kvscope/opt/cuda/kernels.hpp"

namespace kvscope::opt::cuda {
namespace {

using detail::kBlock;
using detail::load;

/// One block per slot; threads over dimensions, each accumulating its
/// dimensions over the slot's entries in order (the CPU kernel's order).
template <class S>
__global__ void ragged_rows(RaggedPlan plan, const S* k, const S* v, std::int64_t tokens, int d, S* k_out, S* v_out) {
  extern __shared__ float acc[];  // d key values, then d value values
  const std::int64_t r = blockIdx.x;
  int h = 0;
  while (h + 1 < plan.heads && plan.offsets[h + 1] <= r) ++h;  // the slot's head (heads are few)
  const S* kh = k + static_cast<std::int64_t>(h) * tokens * d;
  const S* vh = v + static_cast<std::int64_t>(h) * tokens * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float ak = 0.0f, av = 0.0f;
    for (std::int64_t e = plan.row_ptr[r]; e < plan.row_ptr[r + 1]; ++e) {
      const std::int64_t j = plan.token[e];
      const float ck = plan.coef_k[e], cv = plan.coef_v[e];
      if (ck != 0.0f) ak += ck * load(kh, j * d + i);
      if (cv != 0.0f) av += cv * load(vh, j * d + i);
    }
    acc[i] = ak;
    acc[d + i] = av;
  }
  __syncthreads();
  if (plan.rotate != nullptr && plan.rotate[r] != 0)
    for (int i = threadIdx.x; i < d / 2; i += blockDim.x)
      math::rope_rotate_pair(acc[i], acc[i + d / 2], i, d, static_cast<double>(plan.rotate[r]), plan.rope_theta);
  __syncthreads();
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    k_out[r * d + i] = detail::store_as<S>(acc[i]);
    v_out[r * d + i] = detail::store_as<S>(acc[d + i]);
  }
}

/// Pass 1, one block per q head: every slot's logit into `logits` (indexed by
/// global slot, one row per q head), then the block's max and normaliser.
template <class S>
__global__ void decode_logits(const float* q, int G, int d, const std::int64_t* offsets, std::int64_t total,
                              const S* k, const float* log_bias, float* logits, float* stats) {
  extern __shared__ float smem[];  // d floats of the scaled query, then kBlock scratch
  float* qs = smem;
  float* scratch = smem + d;
  const int h = blockIdx.x, g = h / G;
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  for (int i = threadIdx.x; i < d; i += blockDim.x) qs[i] = q[static_cast<std::int64_t>(h) * d + i] * scale;
  __syncthreads();
  float* row = logits + static_cast<std::int64_t>(h) * total;
  float m = -INFINITY;
  for (std::int64_t r = offsets[g] + threadIdx.x; r < offsets[g + 1]; r += blockDim.x) {
    float x = 0.0f;
    for (int i = 0; i < d; ++i) x += qs[i] * load(k, r * d + i);
    if (log_bias != nullptr) x += log_bias[r];
    row[r] = x;
    m = fmaxf(m, x);
  }
  const float M = detail::block_max(m, scratch);
  float s = 0.0f;
  for (std::int64_t r = offsets[g] + threadIdx.x; r < offsets[g + 1]; r += blockDim.x) s += expf(row[r] - M);
  const float L = detail::block_sum(s, scratch);
  if (threadIdx.x == 0) {
    stats[2 * h] = M;
    stats[2 * h + 1] = L;
  }
}

/// Pass 2, one block per q head: out[i] = sum_r p_r v[r, i], slots in order.
template <class S>
__global__ void decode_values(int G, int d, const std::int64_t* offsets, std::int64_t total, const S* v,
                              const float* logits, const float* stats, float* out) {
  const int h = blockIdx.x, g = h / G;
  const float M = stats[2 * h], L = stats[2 * h + 1];
  const float inv = L > 0.0f ? 1.0f / L : 0.0f;
  const float* row = logits + static_cast<std::int64_t>(h) * total;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float acc = 0.0f;
    for (std::int64_t r = offsets[g]; r < offsets[g + 1]; ++r) acc += expf(row[r] - M) * load(v, r * d + i);
    out[static_cast<std::int64_t>(h) * d + i] = acc * inv;
  }
}

}  // namespace

void apply_ragged_plan(const RaggedPlan& plan, DType dtype, const void* k, const void* v, std::int64_t tokens,
                       int head_dim, void* k_out, void* v_out, Stream stream) {
  std::int64_t slots = 0;  // offsets live on the device: the slot count comes back once
  detail::check(cudaMemcpyAsync(&slots, plan.offsets + plan.heads, sizeof slots, cudaMemcpyDeviceToHost, stream),
                "cudaMemcpyAsync");
  detail::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  if (slots == 0) return;
  const std::size_t shared = 2 * static_cast<std::size_t>(head_dim) * sizeof(float);
  detail::dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    ragged_rows<S><<<static_cast<unsigned>(slots), 128, shared, stream>>>(
        plan, static_cast<const S*>(k), static_cast<const S*>(v), tokens, head_dim, static_cast<S*>(k_out),
        static_cast<S*>(v_out));
  });
  KVSCOPE_CUDA_LAUNCHED("ragged_rows");
}

void decode_attention(const float* q, int q_heads, int kv_heads, int head_dim, const std::int64_t* offsets,
                      std::int64_t total_slots, DType dtype, const void* k, const void* v, const float* log_bias,
                      float* out, Stream stream) {
  if (q_heads == 0) return;
  const int G = q_heads / kv_heads, d = head_dim;
  detail::Scratch<float> logits(static_cast<std::int64_t>(q_heads) * total_slots, stream), stats(2LL * q_heads, stream);
  const std::size_t shared = static_cast<std::size_t>(d + kBlock) * sizeof(float);
  detail::dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    decode_logits<S><<<static_cast<unsigned>(q_heads), kBlock, shared, stream>>>(
        q, G, d, offsets, total_slots, static_cast<const S*>(k), log_bias, logits.get(), stats.get());
    KVSCOPE_CUDA_LAUNCHED("decode_logits");
    decode_values<S><<<static_cast<unsigned>(q_heads), 128, 0, stream>>>(G, d, offsets, total_slots,
                                                                          static_cast<const S*>(v), logits.get(),
                                                                          stats.get(), out);
    KVSCOPE_CUDA_LAUNCHED("decode_values");
  });
}

}  // namespace kvscope::opt::cuda
