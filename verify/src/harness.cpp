#include "kvscope/verify/harness.hpp"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "kvscope/opt/ragged_cache.hpp"
#include "kvscope/reference/plan_apply.hpp"
#include "kvscope/reference/plan_checker.hpp"
#include "kvscope/reference/scorer.hpp"
#include "kvscope/replay/layer_input.hpp"

namespace kvscope::verify {
namespace {

struct BackendRun {
  ref::LayerPlans plans;
  opt::RaggedCache cache;  // of the reference plans
  std::vector<float> out;  // decode attention over `cache`
};

BackendRun run_backend(const opt::BackendMethod& backend, const opt::LayerStorage& storage,
                       const std::vector<Plan>& ref_plans, const std::vector<float>& q, int q_heads,
                       std::int64_t budget, double theta, bool bias, int threads) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  BackendRun r;
  try {
    r.plans = backend.prefill(storage, budget);
    r.cache = opt::compact(storage, ref_plans, theta);
    r.out = opt::decode_attention(r.cache, q, q_heads, bias);
  } catch (...) {
    omp_set_num_threads(saved);
    throw;
  }
  omp_set_num_threads(saved);
  return r;
}

bool same_bits(const opt::StorageBuffer& a, const opt::StorageBuffer& b) {
  if (a.size() != b.size()) return false;
  for (std::int64_t i = 0; i < a.size(); ++i) {
    const float x = a.get(i), y = b.get(i);
    if (std::memcmp(&x, &y, sizeof x) != 0) return false;
  }
  return true;
}

/// The plan checker on every plan of `plans` and the allocation law on its
/// head budgets, with the laws `method` declares; each violation goes to `fail`.
template <class Fail>
void check_laws(const ref::Method& method, const ref::LayerPlans& plans, std::int64_t budget, Fail&& fail) {
  const ref::Laws& laws = method.laws();
  if (plans.head_budgets.size() != plans.plans.size()) {
    fail("backend returned " + std::to_string(plans.head_budgets.size()) + " head budgets for " +
         std::to_string(plans.plans.size()) + " plans");
    return;
  }
  const ref::PlanCheck allocation = ref::check_allocation(plans.head_budgets, budget, laws.allocation);
  if (!allocation.ok()) fail("backend head budgets: " + allocation.summary(1));
  for (std::size_t h = 0; h < plans.plans.size(); ++h) {
    const Plan& p = plans.plans[h];
    const std::int64_t b = plans.head_budgets[h];
    const ref::PlanCheck c =
        ref::check_plan(p, {laws.prefill_budget, b, laws.conservation, method.protected_tokens(p.n, b)});
    if (!c.ok()) fail("kv head " + std::to_string(h) + " backend plan: " + c.summary(1));
  }
}

}  // namespace

LayerVerdict verify_layer(const ref::Method& reference, const opt::BackendMethod& backend, const TraceMeta& meta,
                          int layer, const LayerData& data, std::int64_t budget, const VerifyOptions& options,
                          const LayerCouplings& couplings) {
  LayerVerdict v;
  v.layer = layer;
  const Tolerance tol = tolerance(meta.dtype);
  const int d = meta.head_dim, hq = meta.q_heads, hkv = meta.kv_heads;
  const std::int64_t T = meta.prompt_len;
  const auto fail = [&v](const std::string& why) {
    if (v.failure.empty()) v.failure = why;
  };

  // Reference: plans, the scores they were decided with, caches in double.
  ref::LayerInput in = replay::make_layer_input(meta, layer, data);
  in.coupling = couplings.reference;
  const ref::LayerPlans rp = reference.prefill(in, budget);
  const std::optional<ref::LayerScores> scores = reference.decision_scores(in, rp, budget);
  std::vector<ref::HeadCache> ref_caches;
  for (int h = 0; h < hkv; ++h)
    ref_caches.push_back(ref::apply_plan(rp.plans[static_cast<std::size_t>(h)], replay::head_matrix(data.prefill_k, h),
                                         replay::head_matrix(data.prefill_v, h), meta.rope_theta));

  // The decode query of every q head.
  std::vector<float> q(static_cast<std::size_t>(hq * d));
  for (int h = 0; h < hq; ++h) {
    const auto row = meta.decode_steps > 0 ? data.decode_q.row(h, 0) : data.prefill_q.row(h, T - 1);
    std::copy(row.begin(), row.end(), q.begin() + static_cast<std::ptrdiff_t>(h) * d);
  }

  // Backend, at one thread and at N: the two runs must agree bit for bit.
  opt::LayerStorage storage = opt::pack_layer(meta, layer, data);
  storage.coupling = couplings.backend;
  v.threads = options.threads > 0 ? options.threads : omp_get_max_threads();
  const BackendRun one = run_backend(backend, storage, rp.plans, q, hq, budget, meta.rope_theta,
                                     options.log_count_bias, 1);
  const BackendRun many = run_backend(backend, storage, rp.plans, q, hq, budget, meta.rope_theta,
                                      options.log_count_bias, v.threads);
  v.deterministic = one.plans.plans == many.plans.plans && one.plans.head_budgets == many.plans.head_budgets && same_bits(one.cache.k, many.cache.k) &&
                    same_bits(one.cache.v, many.cache.v) &&
                    std::memcmp(one.out.data(), many.out.data(), one.out.size() * sizeof(float)) == 0;
  if (!v.deterministic) fail("results differ between 1 and " + std::to_string(v.threads) + " threads");

  // Laws: the backend's plans and budgets must keep the method's laws, as
  // replay requires of them (a plan replay would refuse must fail here too).
  if (one.plans.plans.size() != rp.plans.size()) fail("backend returned " + std::to_string(one.plans.plans.size()) + " plans");
  check_laws(reference, one.plans, budget, fail);

  // Selections: the backend's own plans against the reference's.
  std::vector<char> prot(static_cast<std::size_t>(T), 0);
  if (scores)
    for (std::int64_t j : scores->protected_tokens) prot[static_cast<std::size_t>(j)] = 1;
  for (std::size_t h = 0; h < rp.plans.size() && h < one.plans.plans.size(); ++h) {
    const ref::VecX* s = scores ? &scores->per_kv_head[h] : nullptr;
    const double margin = scores && h < scores->head_margin.size() ? scores->head_margin[h]
                                                                    : std::numeric_limits<double>::infinity();
    v.heads.push_back(compare_selection(rp.plans[h], one.plans.plans[h], s, prot, tol.score_delta, margin,
                                        scores && scores->reweights_follow_decisions));
    if (!v.heads.back().pass()) fail("kv head " + std::to_string(h) + " selection: " + v.heads.back().first_mismatch);
  }

  // Numbers: the backend's caches of the reference plans, then decode attention.
  std::vector<double> rk, rv, nk, nv;
  std::vector<float> ok, ov;
  for (int h = 0; h < hkv; ++h) {
    const ref::HeadCache& c = ref_caches[static_cast<std::size_t>(h)];
    for (std::int64_t i = 0; i < c.K.size(); ++i) {
      rk.push_back(c.K.data()[i]);
      rv.push_back(c.V.data()[i]);
      nk.push_back(round_to_dtype(static_cast<float>(c.K.data()[i]), meta.dtype));
      nv.push_back(round_to_dtype(static_cast<float>(c.V.data()[i]), meta.dtype));
    }
  }
  for (std::int64_t i = 0; i < one.cache.k.size(); ++i) {
    ok.push_back(one.cache.k.get(i));
    ov.push_back(one.cache.v.get(i));
  }
  if (ok.size() != rk.size()) {
    fail("backend cache holds " + std::to_string(ok.size()) + " values, reference " + std::to_string(rk.size()));
    return v;
  }
  v.keys = compare_numbers(rk, ok, nk, tol);
  v.values = compare_numbers(rv, ov, nv, tol);
  if (!v.keys.pass) fail("keys: " + v.keys.why);
  if (!v.values.pass) fail("values: " + v.values.why);

  std::vector<double> ro, no;
  std::vector<float> oo;
  double max_logit = 0;
  for (int h = 0; h < hq; ++h) {
    const ref::HeadCache& c = ref_caches[static_cast<std::size_t>(ref::kv_head_of(h, hq, hkv))];
    if (c.plan.slots() == 0) continue;  // budget 0: nothing to attend to (decode appends the new token first)
    ref::VecX qh(d);
    for (int i = 0; i < d; ++i) qh[i] = static_cast<double>(q[static_cast<std::size_t>(h * d + i)]);
    max_logit = std::max(max_logit, (c.K * qh).cwiseAbs().maxCoeff() / std::sqrt(static_cast<double>(d)));
    const ref::VecX bias = ref::log_count_bias(c.plan);
    const ref::VecX* b = options.log_count_bias ? &bias : nullptr;
    const ref::VecX o = ref::attend(qh, c.K, c.V, b).output;
    // Naive low precision: the same attention over the cache rounded to the storage dtype.
    const ref::MatX Kr = c.K.unaryExpr([&](double x) { return static_cast<double>(round_to_dtype(static_cast<float>(x), meta.dtype)); });
    const ref::MatX Vr = c.V.unaryExpr([&](double x) { return static_cast<double>(round_to_dtype(static_cast<float>(x), meta.dtype)); });
    const ref::VecX on = ref::attend(qh, Kr, Vr, b).output;
    for (int i = 0; i < d; ++i) {
      ro.push_back(o[i]);
      no.push_back(on[i]);
      oo.push_back(one.out[static_cast<std::size_t>(h * d + i)]);
    }
  }
  // A logit of magnitude L computed in fp32 is off by ~L u32, and over keys
  // rounded to the storage dtype by ~L u(dtype); the softmax passes that on as
  // a relative error. So the output tolerance grows with the largest logit
  // (the attention's condition number): docs/verification.md.
  Tolerance out_tol = tol;
  out_tol.rel_l2 += 4.0 * unit_roundoff(meta.dtype) * max_logit;
  out_tol.floor += 4.0 * unit_roundoff(DType::kF32) * max_logit;
  out_tol.cosine_min = std::min(tol.cosine_min, 1.0 - 0.5 * out_tol.rel_l2 * out_tol.rel_l2);  // 1 - cos ~ rel^2 / 2
  v.outputs = compare_numbers(ro, oo, no, out_tol);
  if (!v.outputs.pass) fail("decode outputs: " + v.outputs.why);
  if (!v.pass()) {
    const auto as_double = [](const auto& xs) { return std::vector<double>(xs.begin(), xs.end()); };
    v.evidence.push_back({"reference_outputs", ro});
    v.evidence.push_back({"backend_outputs", as_double(oo)});
    for (std::size_t h = 0; h < rp.plans.size() && h < one.plans.plans.size(); ++h) {
      v.evidence.push_back({"reference_tokens_kv" + std::to_string(h), as_double(rp.plans[h].token)});
      v.evidence.push_back({"backend_tokens_kv" + std::to_string(h), as_double(one.plans.plans[h].token)});
    }
    if (rk.size() <= (std::size_t{1} << 20)) {
      v.evidence.push_back({"reference_keys", rk});
      v.evidence.push_back({"backend_keys", as_double(ok)});
      v.evidence.push_back({"reference_values", rv});
      v.evidence.push_back({"backend_values", as_double(ov)});
    }
  }
  return v;
}

}  // namespace kvscope::verify
