// CPU prefill of EMS: s_Glo (accumulated attention, or the trace's recorded
// column sums) and s_Loc (window attention) by the score kernels, the centre
// assignment by cpu::centre_assignment; every decision (window, centres by
// s_GL, head-adaptive merge share, zero class, merge weights, norm-preserving
// key coefficients) is ref::ems_compress, shared with the reference.
#include <algorithm>

#include "cpu_families.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/opt/cpu/evict_merge.hpp"
#include "kvscope/opt/cpu/scores.hpp"
#include "kvscope/reference/methods/ems.hpp"

namespace kvscope::opt {
namespace {

cpu::Reduce group_rule(ref::Reduce r) {
  return r == ref::Reduce::kSum ? cpu::Reduce::kSum : r == ref::Reduce::kMean ? cpu::Reduce::kMean : cpu::Reduce::kMax;
}

/// Rows of kv head h of a [heads, T, d] storage buffer as a double matrix (exact).
ref::MatX head_rows(const StorageBuffer& x, int h, std::int64_t T, int d) {
  ref::MatX m(T, d);
  const std::int64_t base = static_cast<std::int64_t>(h) * T * d;
  for (std::int64_t t = 0; t < T; ++t)
    for (int i = 0; i < d; ++i) m(t, i) = static_cast<double>(x.get(base + t * d + i));
  return m;
}

class Ems final : public BackendMethod {
 public:
  explicit Ems(const ref::Params& p) : c_(ref::ems_config(p)) {}

  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    if (budget < 0) throw Error(ErrorKind::kImpossibleBudget, "ems: negative budget " + std::to_string(budget));
    const std::int64_t T = in.shape.tokens;
    const int hq = in.shape.q_heads, hkv = in.shape.kv_heads, d = in.shape.head_dim;
    std::vector<float> glo(static_cast<std::size_t>(hkv * T), 0.0f), loc(glo.size(), 0.0f);
    if (T > budget) {  // nothing to compress otherwise: no scores needed
      std::vector<float> computed;
      const float* acc = accumulated_attention(in, computed);
      const std::vector<float> win = window_scores(in, c_.obs_window, cpu::Reduce::kSum);
      cpu::group_reduce(acc, hq, hkv, T, group_rule(c_.group), glo.data());
      cpu::group_reduce(win.data(), hq, hkv, T, group_rule(c_.group), loc.data());
    }
    std::vector<Plan> plans;
    for (int h = 0; h < hkv; ++h) {
      const ref::MatX K = head_rows(in.k, h, T, d), V = head_rows(in.v, h, T, d);
      ref::EmsItems items;
      items.K = &K;
      items.V = &V;
      items.glo = ref::VecX(T);
      items.loc = ref::VecX(T);
      for (std::int64_t t = 0; t < T; ++t) {
        items.glo[t] = glo[static_cast<std::size_t>(h * T + t)];
        items.loc[t] = loc[static_cast<std::size_t>(h * T + t)];
      }
      items.position = ref::index_range(0, T);
      const ref::EmsAssignFn assign = [&](const std::vector<std::int64_t>& rest, const std::vector<std::int64_t>& centres,
                                          const std::vector<char>& can_take) {
        const std::size_t R = rest.size();
        std::vector<float> best(R), second(R), any(R);
        ref::EmsAssignment a;
        a.centre.resize(R);
        cpu::dispatch_storage(in.k.dtype(), [&](auto tag) {
          using S = decltype(tag);
          const std::int64_t off = static_cast<std::int64_t>(h) * T * d;
          cpu::centre_assignment(in.k.data<S>() + off, in.v.data<S>() + off, d, rest.data(),
                                 static_cast<std::int64_t>(R), centres.data(), static_cast<std::int64_t>(centres.size()),
                                 can_take.data(), c_.similarity == ref::EmsSimilarity::kKeys,
                                 static_cast<float>(c_.tau), best.data(), second.data(), a.centre.data(), any.data());
        });
        a.best.assign(best.begin(), best.end());
        a.second.assign(second.begin(), second.end());
        a.any.assign(any.begin(), any.end());
        return a;
      };
      plans.push_back(ref::ems_compress(items, budget, c_, &assign).plan);
    }
    return ref::LayerPlans::uniform(std::move(plans), budget);
  }

 private:
  ref::EmsConfig c_;
};

}  // namespace

std::unique_ptr<BackendMethod> make_cpu_ems(const ref::Params& p) { return std::make_unique<Ems>(p); }

}  // namespace kvscope::opt
