// Drives a method through prefill and S decode steps by hand, with the replay
// protocol (docs/replay.md): append the new token, before_attend, every q head
// attends, after_attend; the plan checker runs after prefill and every step
// (throws Error(kInvariant)). A callback sees every step, so tests can look at
// the policy's state between the attention and the eviction it caused.
#pragma once

#include <functional>
#include <random>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/plan_apply.hpp"
#include "kvscope/reference/plan_checker.hpp"
#include "kvscope_layer.hpp"

namespace kvscope::tests {

/// A random layer with S decode tokens after the T prompt tokens.
struct DecodeLayer {
  LayerFixture prefill;              // first T rows
  std::vector<ref::MatX> K, V;       // per kv head, [T + S, d]
  std::vector<ref::MatX> decode_q;   // per q head, [S, d]
  std::int64_t steps() const { return decode_q.empty() ? 0 : decode_q.front().rows(); }
};

/// `scale` multiplies the queries: larger = peakier attention.
inline DecodeLayer random_decode_layer(int q_heads, int kv_heads, std::int64_t T, std::int64_t S, int d,
                                       std::uint64_t seed, double scale = 1.0) {
  DecodeLayer L;
  const LayerFixture full = random_layer(q_heads, kv_heads, T + S, d, seed);
  L.prefill = random_layer(q_heads, kv_heads, T, d, seed);
  for (int h = 0; h < q_heads; ++h) {
    L.prefill.input.q[static_cast<std::size_t>(h)] = scale * full.input.q[static_cast<std::size_t>(h)].topRows(T);
    L.decode_q.push_back(scale * full.input.q[static_cast<std::size_t>(h)].bottomRows(S));
  }
  for (int h = 0; h < kv_heads; ++h) {
    L.K.push_back(full.input.k[static_cast<std::size_t>(h)]);
    L.V.push_back(full.input.v[static_cast<std::size_t>(h)]);
    L.prefill.input.k[static_cast<std::size_t>(h)] = L.K.back().topRows(T);
    L.prefill.input.v[static_cast<std::size_t>(h)] = L.V.back().topRows(T);
  }
  return L;
}

/// What a step callback sees: the tokens each kv head held while the query
/// attended (before after_attend's eviction), the probabilities, the caches after.
struct StepView {
  std::int64_t step = 0;
  const ref::DecodePolicy* policy = nullptr;
  std::vector<std::vector<std::int64_t>> attended_tokens;  // per kv head, slot order
  const std::vector<ref::VecX>* probs = nullptr;
  const std::vector<ref::HeadCache>* caches = nullptr;
};

inline void check_heads(const ref::Method& m, const std::vector<ref::HeadCache>& caches,
                        const std::vector<std::int64_t>& budgets, ref::BudgetLaw law, const std::string& stage) {
  for (std::size_t h = 0; h < caches.size(); ++h) {
    const Plan& p = caches[h].plan;
    ref::require_valid_plan(p, {law, budgets[h], m.laws().conservation, m.protected_tokens(p.n, budgets[h])},
                            m.name() + " " + stage + " kv head " + std::to_string(h));
  }
}

/// Runs prefill + every decode step; returns the final caches.
inline std::vector<ref::HeadCache> drive(const ref::Method& m, const DecodeLayer& L, std::int64_t budget,
                                         const std::function<void(const StepView&)>& on_step = {}) {
  const ref::LayerInput& in = L.prefill.input;
  const int q_heads = static_cast<int>(in.q.size()), kv_heads = static_cast<int>(in.k.size());
  const double theta = 10000.0;
  const ref::LayerPlans lp = m.prefill(in, budget);
  std::vector<ref::HeadCache> caches;
  for (int h = 0; h < kv_heads; ++h)
    caches.push_back(ref::apply_plan(lp.plans[static_cast<std::size_t>(h)], L.K[static_cast<std::size_t>(h)],
                                     L.V[static_cast<std::size_t>(h)], theta));
  check_heads(m, caches, lp.head_budgets, m.laws().prefill_budget, "prefill");
  auto policy = m.decoder(in, lp.head_budgets);
  auto apply = [&](const ref::StepPlans& plans) {
    for (std::size_t h = 0; h < plans.size(); ++h)
      if (plans[h]) caches[h] = ref::apply_plan(compose(*plans[h], caches[h].plan), L.K[h], L.V[h], theta);
  };
  std::vector<ref::VecX> queries(static_cast<std::size_t>(q_heads)), probs(queries.size());
  for (std::int64_t s = 0; s < L.steps(); ++s) {
    for (std::size_t h = 0; h < caches.size(); ++h) {
      Plan p = caches[h].plan;
      append_token(p);
      caches[h] = ref::apply_plan(p, L.K[h], L.V[h], theta);
    }
    for (int h = 0; h < q_heads; ++h) queries[static_cast<std::size_t>(h)] = L.decode_q[static_cast<std::size_t>(h)].row(s).transpose();
    const ref::DecodeStep step{s, in.tokens() + s, &caches, &queries};
    if (policy) apply(policy->before_attend(step));
    StepView view{s, policy.get(), {}, &probs, &caches};
    for (const auto& c : caches) view.attended_tokens.push_back(c.plan.token);
    for (int h = 0; h < q_heads; ++h) {
      const auto& c = caches[static_cast<std::size_t>(ref::kv_head_of(h, q_heads, kv_heads))];
      probs[static_cast<std::size_t>(h)] = ref::attend(queries[static_cast<std::size_t>(h)], c.K, c.V).probs;
    }
    if (policy) apply(policy->after_attend(step, probs));
    check_heads(m, caches, lp.head_budgets, m.laws().decode_budget, "decode step " + std::to_string(s));
    if (on_step) on_step(view);
  }
  return caches;
}

}  // namespace kvscope::tests
