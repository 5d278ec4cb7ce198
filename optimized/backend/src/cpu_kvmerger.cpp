// KVMerger prefill on the CPU: the hot quantities are kernels (accumulated
// attention, adjacent-key cosines, merge-set segmentation with pivots,
// Gaussian-kernel weights); the decisions (protected recent band and heavy
// hitters, which edges merge in threshold / budget / capped mode) are the
// reference's one implementation, ref::kvmerger_edges. The merged cache is
// built from the plan's CSR rows by apply_ragged_plan like every other plan.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <span>

#include "cpu_families.hpp"
#include "kvscope/opt/cpu/merging.hpp"
#include "kvscope/opt/cpu/scores.hpp"
#include "kvscope/opt/cpu/select.hpp"
#include "kvscope/reference/methods/kvmerger.hpp"

namespace kvscope::opt {
namespace {

cpu::SigmaMode sigma_of(ref::KVMergerConfig::Sigma s) {
  return s == ref::KVMergerConfig::Sigma::kFixed     ? cpu::SigmaMode::kFixed
         : s == ref::KVMergerConfig::Sigma::kLiteral ? cpu::SigmaMode::kLiteral
                                                     : cpu::SigmaMode::kMeanDistance;
}

/// ref::top_k's selection by the CPU kernel, on `fp32`: the fp32 numbers
/// `scores` was widened from (exactly, so the ranks are the same), or null to
/// narrow them here. A NaN among the candidates goes to ref::top_k, which
/// raises its error; a vectorised check of the whole row first spares the
/// indexed search when there is none.
ref::Selection cpu_top_k(const ref::VecX& scores, const float* fp32, std::span<const std::int64_t> candidates,
                         std::int64_t k) {
  Eigen::VectorXf narrowed;
  if (!fp32) {
    narrowed = scores.cast<float>();
    fp32 = narrowed.data();
  }
  if (cpu::any_nan(fp32, scores.size()))
    for (std::int64_t j : candidates)
      if (std::isnan(fp32[j])) return ref::top_k(scores, candidates, k);
  ref::Selection out;
  cpu::top_k(fp32, candidates, k, out.kept);
  return out;
}

class KVMergerCpu final : public BackendMethod {
 public:
  explicit KVMergerCpu(const ref::Params& p) : c_(ref::kvmerger_config(p)) {}

  ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const override {
    const std::int64_t T = in.shape.tokens;
    const int hq = in.shape.q_heads, hkv = in.shape.kv_heads, d = in.shape.head_dim;
    const auto heads = static_cast<std::size_t>(hkv);
    const int layers = in.meta ? in.meta->layers : 0;
    if (c_.skipped(in.layer, layers))
      return ref::LayerPlans::uniform(std::vector<Plan>(heads, Plan::identity(T)), std::max(budget, T));
    if (T <= budget)  // the budget covers the cache: nothing to compress
      return ref::LayerPlans::uniform(std::vector<Plan>(heads, Plan::identity(T)), budget);

    // Pivot / heavy-hitter scores: the group's accumulated attention.
    std::vector<float> computed;
    const float* acc = accumulated_attention(in, computed);
    std::vector<float> score(static_cast<std::size_t>(hkv * T));
    cpu::group_reduce(acc, hq, hkv, T, to_cpu(c_.gqa), score.data());

    // Heads in parallel, each head's cosines, decisions and weights on one
    // thread: the head's keys (2 MiB in fp16 at T = 8192, d = 128) are read
    // by the cosines and again by the weights, from L2 when one thread does
    // both, where a cosine pass over every head first left them in L3.
    std::vector<Plan> plans(heads);
    parallel_heads(hkv, [&](int g) {
      std::vector<std::int64_t> begin, pivot;
      std::vector<float> w(static_cast<std::size_t>(T)), cosine(static_cast<std::size_t>(std::max<std::int64_t>(T - 1, 0)));
      cpu::dispatch_storage(in.k.dtype(), [&](auto tag) {
        using S = decltype(tag);
        const cpu::LayerShape one_head{1, 1, d, T};
        cpu::adjacent_key_cosine(one_head, in.k.data<S>() + static_cast<std::int64_t>(g) * T * d, cosine.data());
      });
      const float* sc = score.data() + static_cast<std::int64_t>(g) * T;
      const float* co = cosine.data();
      // The decisions, shared with the reference (fp32 -> double is exact, so ranks are unchanged).
      const ref::VecX s = Eigen::Map<const Eigen::VectorXf>(sc, T).cast<double>();
      const ref::VecX c = Eigen::Map<const Eigen::VectorXf>(co, std::max<std::int64_t>(T - 1, 0)).cast<double>();
      // The decisions select on s (heavy hitters) and c (budget mode): the
      // kernel takes the fp32 arrays they were widened from.
      const auto select = [&](const ref::VecX& v, std::span<const std::int64_t> candidates, std::int64_t k) {
        return cpu_top_k(v, &v == &s ? sc : &v == &c ? co : nullptr, candidates, k);
      };
      const ref::KVMergerEdges edges = ref::kvmerger_edges(c, s, budget, c_, select);
      cpu::merge_runs(T, edges.merge.data(), sc, begin, pivot);
      const auto runs = static_cast<std::int64_t>(pivot.size());
      cpu::dispatch_storage(in.k.dtype(), [&](auto tag) {
        using S = decltype(tag);
        cpu::gaussian_merge_weights(in.k.data<S>() + static_cast<std::int64_t>(g) * T * d, T, d, begin.data(),
                                    pivot.data(), runs, sigma_of(c_.sigma_mode), static_cast<float>(c_.sigma), w.data(),
                                    /*keys_cached=*/true);
      });
      // Every token is in exactly one run and the runs are in order, so the
      // plan is filled in bulk (ref::kvmerger_head_plan's slots, one per run):
      // rows = the runs, tokens 0..T-1, coefficients from the weights
      // renormalised per run (cpu::run_coefficients), position = the pivot (a
      // one-token run's own token), count = the size.
      Plan& p = plans[static_cast<std::size_t>(g)];
      p.n = T;
      p.token.resize(static_cast<std::size_t>(T));
      std::iota(p.token.begin(), p.token.end(), std::int64_t{0});
      p.coef_k.resize(static_cast<std::size_t>(T));
      p.coef_v.resize(static_cast<std::size_t>(T));
      p.count.resize(static_cast<std::size_t>(runs));
      cpu::run_coefficients(w.data(), begin.data(), runs, c_.scaled_values, p.coef_k.data(), p.coef_v.data(),
                            p.count.data());
      p.row_ptr = std::move(begin);
      p.position = std::move(pivot);
    });
    return ref::LayerPlans::uniform(std::move(plans), budget);
  }

 private:
  ref::KVMergerConfig c_;
};

}  // namespace

std::unique_ptr<BackendMethod> make_cpu_kvmerger(const ref::Params& p) { return std::make_unique<KVMergerCpu>(p); }

}  // namespace kvscope::opt
