#include "kvscope/opt/cpu/ragged.hpp"

#include <cmath>
#include <vector>

#include "instantiate.hpp"
#include "kvscope/core/kernel_math.hpp"

namespace kvscope::opt::cpu {

template <class S>
void apply_ragged_plan(const RaggedPlan& plan, const S* k, const S* v, std::int64_t tokens, int head_dim, S* k_out,
                       S* v_out) {
  const int d = head_dim;
  for (int h = 0; h < plan.heads; ++h) {
    const S* kh = k + static_cast<std::int64_t>(h) * tokens * d;
    const S* vh = v + static_cast<std::int64_t>(h) * tokens * d;
#pragma omp parallel
    {
      std::vector<float> ak(static_cast<std::size_t>(d)), av(static_cast<std::size_t>(d)), row(static_cast<std::size_t>(d));
#pragma omp for schedule(static)
      for (std::int64_t r = plan.offsets[h]; r < plan.offsets[h + 1]; ++r) {
        std::fill(ak.begin(), ak.end(), 0.0f);
        std::fill(av.begin(), av.end(), 0.0f);
        for (std::int64_t e = plan.row_ptr[r]; e < plan.row_ptr[r + 1]; ++e) {
          const std::int64_t j = plan.token[e];
          const float ck = plan.coef_k[e], cv = plan.coef_v[e];
          if (ck != 0.0f) {
            load_row(kh + j * d, d, row.data());
#pragma omp simd
            for (int i = 0; i < d; ++i) ak[static_cast<std::size_t>(i)] += ck * row[static_cast<std::size_t>(i)];
          }
          if (cv != 0.0f) {
            load_row(vh + j * d, d, row.data());
#pragma omp simd
            for (int i = 0; i < d; ++i) av[static_cast<std::size_t>(i)] += cv * row[static_cast<std::size_t>(i)];
          }
        }
        if (plan.rotate != nullptr && plan.rotate[r] != 0)
          for (int i = 0; i < d / 2; ++i)
            math::rope_rotate_pair(ak[static_cast<std::size_t>(i)], ak[static_cast<std::size_t>(i + d / 2)], i, d,
                                   static_cast<double>(plan.rotate[r]), plan.rope_theta);
        for (int i = 0; i < d; ++i) {
          k_out[r * d + i] = from_f32<S>(ak[static_cast<std::size_t>(i)]);
          v_out[r * d + i] = from_f32<S>(av[static_cast<std::size_t>(i)]);
        }
      }
    }
  }
}

template <class S>
void decode_attention(const float* q, int q_heads, int kv_heads, int head_dim, const std::int64_t* offsets,
                      const S* k, const S* v, const float* log_bias, float* out) {
  const int d = head_dim, G = q_heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel
  {
    std::vector<float> acc(static_cast<std::size_t>(d)), row(static_cast<std::size_t>(d)), qs(static_cast<std::size_t>(d));
#pragma omp for schedule(static)
    for (int h = 0; h < q_heads; ++h) {
      const int g = h / G;
      for (int i = 0; i < d; ++i) qs[static_cast<std::size_t>(i)] = q[static_cast<std::int64_t>(h) * d + i] * scale;
      std::fill(acc.begin(), acc.end(), 0.0f);
      math::OnlineSoftmax sm;
      for (std::int64_t r = offsets[g]; r < offsets[g + 1]; ++r) {
        load_row(k + r * d, d, row.data());
        const float x = dot(qs.data(), row.data(), d) + (log_bias != nullptr ? log_bias[r] : 0.0f);
        float w = 0.0f;
        const float rescale = math::online_softmax_push(sm, x, &w);
        load_row(v + r * d, d, row.data());
#pragma omp simd
        for (int i = 0; i < d; ++i) acc[static_cast<std::size_t>(i)] = acc[static_cast<std::size_t>(i)] * rescale + w * row[static_cast<std::size_t>(i)];
      }
      const float inv = sm.sum > 0.0f ? 1.0f / sm.sum : 0.0f;
      for (int i = 0; i < d; ++i) out[static_cast<std::int64_t>(h) * d + i] = acc[static_cast<std::size_t>(i)] * inv;
    }
  }
}

#define KVSCOPE_RAGGED(S)                                                                                        \
  template void apply_ragged_plan<S>(const RaggedPlan&, const S*, const S*, std::int64_t, int, S*, S*);          \
  template void decode_attention<S>(const float*, int, int, int, const std::int64_t*, const S*, const S*,        \
                                    const float*, float*);
KVSCOPE_CPU_INSTANTIATE(KVSCOPE_RAGGED)

}  // namespace kvscope::opt::cpu
