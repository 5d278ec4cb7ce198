// Makers of the CPU backend's families that live in their own files
// (cpu_<family>.cpp), registered in cpu_methods.cpp's makers() map.
#pragma once

#include <exception>
#include <functional>
#include <memory>
#include <vector>

#include "kvscope/opt/backend.hpp"
#include "kvscope/opt/cpu/scores.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/reference/scores.hpp"

namespace kvscope::opt {

std::unique_ptr<BackendMethod> make_cpu_kvmerger(const ref::Params& p);
std::unique_ptr<BackendMethod> make_cpu_weightedkv(const ref::Params& p);
std::unique_ptr<BackendMethod> make_cpu_ems(const ref::Params& p);
std::unique_ptr<BackendMethod> make_cpu_cam(const MethodSpec& spec, const ref::Params& p);
std::unique_ptr<BackendMethod> make_cpu_dynamickv(const ref::Params& p);

/// The reference's reductions and pooling modes as the kernels' enums.
cpu::Reduce to_cpu(ref::Reduce r);
cpu::Pool to_cpu(ref::Pool p);

/// f(h) for every kv head h on the OpenMP threads, one head per thread at a
/// time (for per-head decision streams). An exception cannot leave an OpenMP
/// region, so each head's is kept and the first in head order is rethrown
/// once all heads are done.
template <class F>
void parallel_heads(int heads, F&& f) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(heads));
#pragma omp parallel for schedule(dynamic, 1)
  for (int h = 0; h < heads; ++h) {
    try {
      f(h);
    } catch (...) {
      errors[static_cast<std::size_t>(h)] = std::current_exception();
    }
  }
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

/// A ForEachIndex (core/for_each.hpp) for the shared decision code's
/// independent per-layer or per-head steps: parallel_heads over the indices.
inline void for_each_on_threads(int n, const std::function<void(int)>& body) { parallel_heads(n, body); }

/// Every q head's accumulated attention, [q_heads, T]: the trace's recorded
/// column sums when it has them (read in place, not copied), else computed by
/// `kernels` into `computed`.
const float* accumulated_attention(const LayerStorage& in, std::vector<float>& computed,
                                   const ScoreKernels& kernels = cpu_score_kernels());

/// Window scores of every q head, [q_heads, T] (cpu::window_scores on the layer's storage).
std::vector<float> window_scores(const LayerStorage& in, std::int64_t window, cpu::Reduce rows);

}  // namespace kvscope::opt
