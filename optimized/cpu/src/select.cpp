#include "kvscope/opt/cpu/select.hpp"

#include <algorithm>
#include <cmath>

#include "instantiate.hpp"
#include "kvscope/core/kernel_math.hpp"

namespace kvscope::opt::cpu {

void top_k(const float* scores, std::span<const std::int64_t> candidates, std::int64_t k,
           std::vector<std::int64_t>& kept) {
  kept.assign(candidates.begin(), candidates.end());
  const auto kk = static_cast<std::ptrdiff_t>(std::clamp<std::int64_t>(k, 0, static_cast<std::int64_t>(kept.size())));
  // A strict total order (score descending, then index ascending) makes the
  // kept set unique whatever nth_element's internal order.
  const auto better = [scores](std::int64_t a, std::int64_t b) {
    return scores[a] != scores[b] ? scores[a] > scores[b] : a < b;
  };
  if (kk < static_cast<std::ptrdiff_t>(kept.size())) std::nth_element(kept.begin(), kept.begin() + kk, kept.end(), better);
  kept.resize(static_cast<std::size_t>(kk));
  std::sort(kept.begin(), kept.end());
}

template <class S>
void adjacent_key_cosine(const LayerShape& s, const S* k, float* out) {
  const std::int64_t T = s.tokens;
  const int d = s.head_dim;
  if (T < 2) return;
#pragma omp parallel
  {
    std::vector<float> a(static_cast<std::size_t>(d)), b(static_cast<std::size_t>(d));
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < static_cast<std::int64_t>(s.kv_heads) * (T - 1); ++r) {
      const std::int64_t h = r / (T - 1), j = r % (T - 1);
      load_row(k + (h * T + j) * d, d, a.data());
      load_row(k + (h * T + j + 1) * d, d, b.data());
      // Cosine is scale-free: scaling each key by a power of two (exact) keeps
      // the squared norms of tiny keys from underflowing (and huge ones from overflowing).
      for (std::vector<float>* x : {&a, &b}) {
        float max_abs = 0.0f;
        for (float v : *x) max_abs = std::max(max_abs, std::abs(v));
        const int e = math::scale_exponent(max_abs), h1 = -e / 2, h2 = -e - h1;
        const float f1 = std::ldexp(1.0f, h1), f2 = std::ldexp(1.0f, h2);
        if (e != 0)
          for (float& v : *x) v = v * f1 * f2;
      }
      out[r] = math::cosine(dot(a.data(), b.data(), d), dot(a.data(), a.data(), d), dot(b.data(), b.data(), d));
    }
  }
}

#define KVSCOPE_SELECT(S) template void adjacent_key_cosine<S>(const LayerShape&, const S*, float*);
KVSCOPE_CPU_INSTANTIATE(KVSCOPE_SELECT)

}  // namespace kvscope::opt::cpu
