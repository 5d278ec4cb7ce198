// The method interface of the reference (DESIGN.md section 3): a prefill call
// that returns one Plan per kv head of a layer, and an optional stateful
// decode policy the replay engine drives step by step.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvscope/core/method_spec.hpp"
#include "kvscope/core/plan.hpp"
#include "kvscope/core/trace_data.hpp"
#include "kvscope/reference/attention.hpp"
#include "kvscope/reference/laws.hpp"

namespace kvscope::ref {

class LayerCoupling;

/// What a method sees of one layer at prefill, in double precision.
struct LayerInput {
  const TraceMeta* meta = nullptr;
  int layer = 0;
  std::vector<MatX> q;  // per q head, [T x d] prefill queries (post-RoPE)
  std::vector<MatX> k;  // per kv head, [T x d]
  std::vector<MatX> v;  // per kv head, [T x d]
  std::vector<VecX> attn_colsum;  // per q head, [T]; empty when the trace has none
  /// The method's own first-pass state (Method::coupling), or nullptr.
  const LayerCoupling* coupling = nullptr;
  std::int64_t tokens() const { return k.empty() ? 0 : k.front().rows(); }
};

/// One kv head's compressed cache: its provenance and contents (K = A_K K_full).
struct HeadCache {
  Plan plan;
  MatX K, V;
};

/// A decode step as the policy sees it: the new token is already appended to
/// every head's cache (one extra slot).
struct DecodeStep {
  std::int64_t step = 0;    // 0-based decode step
  std::int64_t token = 0;   // original index of the new token (T + step)
  const std::vector<HeadCache>* heads = nullptr;  // per kv head
  const std::vector<VecX>* queries = nullptr;     // per q head, this step's query
};

/// Prefill output of one layer: a plan per kv head and the budget each plan
/// answers to. Most methods give every head the layer budget; head-adaptive
/// ones (AdaKV) and layer-adaptive ones (PyramidKV) declare their allocation
/// here, and the plan checker holds each plan to its own entry.
struct LayerPlans {
  std::vector<Plan> plans;                 // per kv head
  std::vector<std::int64_t> head_budgets;  // per kv head, tokens
  /// Every head gets `budget`.
  static LayerPlans uniform(std::vector<Plan> plans, std::int64_t budget) {
    LayerPlans out{std::move(plans), {}};
    out.head_budgets.assign(out.plans.size(), budget);
    return out;
  }
};

/// Per kv head, an optional plan over the head's current slots (nullopt = keep as is).
using StepPlans = std::vector<std::optional<Plan>>;

/// Stateful decode-time compression of one layer.
class DecodePolicy {
 public:
  virtual ~DecodePolicy() = default;
  /// Compression before the query attends (e.g. StreamingLLM evicting for space).
  virtual StepPlans before_attend(const DecodeStep& step) = 0;
  /// Compression after attending; `probs[h]` is q head h's attention over its kv head's slots.
  virtual StepPlans after_attend(const DecodeStep& step, const std::vector<VecX>& probs) = 0;
};

class Scorer;  // scorer.hpp
struct LayerScores;

/// Layer-coupled methods (DynamicKV re-allocates budgets across layers from
/// every layer's scores) see all layers in a first pass before any prefill;
/// prefill then finds this object in LayerInput::coupling.
class LayerCoupling {
 public:
  virtual ~LayerCoupling() = default;
  /// Called once per layer, in layer order, with that layer's prefill input.
  virtual void observe(const LayerInput& in) = 0;
};

/// A configured method (family + preset + parameters resolved).
class Method {
 public:
  virtual ~Method() = default;
  /// Canonical spec with every parameter resolved, e.g. "streaming_llm@paper:recent=auto:sinks=4".
  virtual std::string name() const = 0;
  virtual Laws laws() const = 0;
  /// One plan per kv head over the layer's T prompt tokens; `budget` is the
  /// nominal tokens per kv head (the allocation law says how heads share it).
  virtual LayerPlans prefill(const LayerInput& in, std::int64_t budget) const = 0;
  /// The decode policy for a layer given prefill's per-head budgets, or
  /// nullptr: the cache then grows by one slot per step.
  virtual std::unique_ptr<DecodePolicy> decoder(const LayerInput& in,
                                                const std::vector<std::int64_t>& head_budgets) const = 0;
  /// Tokens of an n-token cache the method promises to keep unchanged (sinks,
  /// recent window), checked by the plan checker.
  virtual std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t budget) const = 0;
  /// First-pass state for layer-coupled methods, or nullptr (the usual case).
  virtual std::unique_ptr<LayerCoupling> coupling(const TraceMeta& /*meta*/, std::int64_t /*budget*/) const {
    return nullptr;
  }
  /// The method's prefill scorer when it is score-then-top-k (AdaKV wraps it), else nullptr.
  virtual const Scorer* scorer() const { return nullptr; }
  /// The scores prefill decided with, given its result `plans` (the
  /// differential harness tells ties from mismatches with them); nullopt for
  /// methods that decide without scores. Defined in scorer.cpp.
  virtual std::optional<LayerScores> decision_scores(const LayerInput& in, const LayerPlans& plans,
                                                     std::int64_t budget) const;
};

/// Canonical "family@preset:key=value..." text of a resolved method.
std::string method_name(const std::string& family, const std::string& preset,
                        const std::map<std::string, std::string>& params);

}  // namespace kvscope::ref
