// CPU prefill of CaM. prefill=simulate: the merge probability of every evicted
// prompt token by cpu::cam_merge_probabilities (the attention of every prompt
// query over its StreamingLLM cache), then ref::cam_stream, shared with the
// reference: position-only eviction, the seeded draws u < p (cam_uniform: the
// same draws on every backend) and the value hand-offs as plan rows.
// prefill=evict|none: position arithmetic only, the reference's decision.
#include <algorithm>

#include "cpu_families.hpp"
#include "kvscope/opt/cpu/evict_merge.hpp"
#include "kvscope/reference/methods/cam.hpp"

namespace kvscope::opt {
namespace {

class CaM final : public BackendMethod {
 public:
  CaM(const MethodSpec& spec, const ref::Params& p) : c_(ref::cam_config(p)), ref_(ref::make_method(spec)) {}

  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    ref::cam_check_budget(c_, budget);
    const std::int64_t T = in.shape.tokens;
    const int hkv = in.shape.kv_heads;
    if (c_.prefill != ref::CamPrefill::kSimulate) {  // no kernel: the reference on a shape-only input
      ref::LayerInput shape_only;
      shape_only.meta = in.meta;
      shape_only.layer = in.layer;
      shape_only.k.assign(static_cast<std::size_t>(hkv), ref::MatX(T, 0));
      shape_only.v = shape_only.k;
      return ref_->prefill(shape_only, budget);
    }
    std::vector<float> p(static_cast<std::size_t>(hkv * T), 0.0f);
    if (c_.gate == ref::CamGate::kBernoulli && T > budget) {
      const std::int64_t width = c_.window > 0 ? c_.window : budget - c_.sinks;
      const cpu::CamAttention a = c_.score == ref::CamScore::kDecode ? cpu::CamAttention::kDecode
                                  : c_.score == ref::CamScore::kStep ? cpu::CamAttention::kStep
                                                                     : cpu::CamAttention::kCumulative;
      cpu::dispatch_storage(in.k.dtype(), [&](auto tag) {
        using S = decltype(tag);
        cpu::cam_merge_probabilities(in.shape, in.q.data<S>(), in.k.data<S>(), c_.sinks, budget, width,
                                     c_.denominator == ref::CamDenominator::kMax, a, p.data());
      });
    }
    std::vector<Plan> plans(static_cast<std::size_t>(hkv));
    parallel_heads(hkv, [&](int h) {
      const std::vector<double> ph(p.begin() + static_cast<std::ptrdiff_t>(h) * T,
                                   p.begin() + static_cast<std::ptrdiff_t>(h + 1) * T);
      plans[static_cast<std::size_t>(h)] = ref::cam_stream(c_, T, budget, in.layer, h, ph).plan;
    });
    return ref::LayerPlans::uniform(std::move(plans), budget);
  }

 private:
  ref::CamConfig c_;
  std::unique_ptr<ref::Method> ref_;
};

}  // namespace

std::unique_ptr<BackendMethod> make_cpu_cam(const MethodSpec& spec, const ref::Params& p) {
  return std::make_unique<CaM>(spec, p);
}

}  // namespace kvscope::opt
