// The optimized side of a method: the same MethodSpec as the reference, its
// prefill computed from the layer's storage with fp32 kernels (optimized/cpu).
// Cheap decisions that are not kernels (budget schedules, head allocation,
// protected tokens, parameter parsing) call the reference's one
// implementation, so a difference between backends can only come from the
// kernels. docs/verification.md ("Differential checks") has the contract.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvscope/core/method_spec.hpp"
#include "kvscope/opt/layer_storage.hpp"
#include "kvscope/reference/method.hpp"
#include "kvscope/reference/scorer.hpp"

namespace kvscope::opt {

enum class Backend { kReference, kCpu, kCuda };
/// "reference" | "cpu" | "cuda"; anything else is Error(kUsage).
Backend parse_backend(const std::string& text);
const char* backend_name(Backend b);

/// A layer's scores per kv head as computed by a backend (fp32), with the
/// protected tokens of score-then-top-k methods.
struct ScoreSet {
  int heads = 0;
  std::int64_t tokens = 0;
  std::vector<float> scores;  // [heads, tokens]
  std::vector<std::int64_t> protected_tokens;
  const float* head(int h) const { return scores.data() + static_cast<std::int64_t>(h) * tokens; }
  /// The same scores as the reference's type (exact: float -> double).
  ref::LayerScores to_reference() const;
};

class BackendScorer {
 public:
  virtual ~BackendScorer() = default;
  virtual ScoreSet score(const LayerStorage& in, std::int64_t budget) const = 0;
};

/// The first pass of a layer-coupled method on a backend (ref::LayerCoupling's
/// twin): observe() sees every layer's storage, in layer order, before the
/// first prefill, which then finds it in LayerStorage::coupling.
class BackendCoupling {
 public:
  virtual ~BackendCoupling() = default;
  virtual void observe(const LayerStorage& in) = 0;
};

class BackendMethod {
 public:
  virtual ~BackendMethod() = default;
  /// First-pass state for layer-coupled methods (DynamicKV), else nullptr.
  virtual std::unique_ptr<BackendCoupling> coupling(const TraceMeta& /*meta*/, std::int64_t /*budget*/) const {
    return nullptr;
  }
  /// One plan per kv head and the budget each answers to (ref::Method::prefill's contract).
  virtual ref::LayerPlans prefill(const LayerStorage& in, std::int64_t budget) const = 0;
  /// The scorer of score-then-top-k methods (AdaKV wraps it), else nullptr.
  virtual const BackendScorer* scorer() const { return nullptr; }
};

/// The heavy score kernels of the score-then-top-k methods, on one device:
/// each returns host fp32 scores for a layer's storage. The scorers and the
/// selection around them are the same code on every backend.
class ScoreKernels {
 public:
  virtual ~ScoreKernels() = default;
  /// [q_heads, T]: softmax rows of the last `window` queries, reduced per key (cpu::window_scores).
  virtual std::vector<float> window_scores(const LayerStorage& in, std::int64_t window, kern::Reduce rows) const = 0;
  /// [q_heads, T]: every causal row's probabilities summed per key (cpu::accumulated_attention).
  virtual std::vector<float> accumulated_attention(const LayerStorage& in) const = 0;
  /// [kv_heads, T]: -||k_j|| (cpu::key_norm_scores).
  virtual std::vector<float> key_norm_scores(const LayerStorage& in) const = 0;
};
/// optimized/cpu's kernels.
const ScoreKernels& cpu_score_kernels();
/// optimized/cuda's kernels on the current device: each call uploads the
/// layer's q and k, runs the kernel, and downloads the scores. Error(kUsage)
/// when this build has no CUDA or no device is present (with CUDA's reason).
const ScoreKernels& cuda_score_kernels();

/// The CPU implementation of `spec`; a family without one is Error(kUsage)
/// listing those that have one.
std::unique_ptr<BackendMethod> make_cpu_method(const MethodSpec& spec);
/// Families the CPU backend implements, in registry order.
std::vector<std::string> cpu_families();
/// The CUDA implementation of `spec`: the score-then-top-k families with their
/// score kernels on the GPU (cuda_score_kernels), selection on the CPU as the
/// cpu backend's; other families are Error(kUsage) listing those it has.
std::unique_ptr<BackendMethod> make_cuda_method(const MethodSpec& spec);
/// Families the CUDA backend implements, in registry order.
std::vector<std::string> cuda_families();

/// ref::select_per_head's contract on fp32 scores with the O(n) top-k kernel:
/// protected tokens plus the best head_budgets[h] - |protected| others.
std::vector<Plan> select_per_head(const ScoreSet& scores, const std::vector<std::int64_t>& head_budgets,
                                  const std::string& method);

}  // namespace kvscope::opt
