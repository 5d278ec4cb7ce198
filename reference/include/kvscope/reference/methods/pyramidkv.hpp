// PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based
// on Pyramidal Information Funneling"): SnapKV's scores and selection with a
// per-layer budget that shrinks linearly from the first layer to the last
// (an arithmetic "pyramid" whose mean is the nominal budget). Two budget
// schedules exist: the authors' integer one (KVCache-Factory) and kvpress's
// float one. docs/algorithms/pyramidkv.md lists presets and sources.
#pragma once

#include <cstdint>
#include <vector>

#include "kvscope/reference/registry.hpp"

namespace kvscope::ref {

enum class PyramidSchedule {
  kInteger,  // KVCache-Factory PyramidKVCluster.update_kv: floor divisions, three branches
  kFloat,    // kvpress PyramidKVPress.get_layer_budget: float, round(), guard falls back to uniform
};

/// Tokens kept per kv head in each of `layers` layers (window included) for a
/// T-token prompt, nominal budget C tokens per head, observation window w.
///  kInteger: min = (C-w)//beta, max = 2(C-w) - min, clipped to T - w;
///            steps = (max-min)//(N-1); layer l keeps max - l*steps + w;
///            T < C: no compression (T); T < 2(C-w): uniform C.
///  kFloat:   the same with target = C (= T(1-cr)) in floats, rounded half to
///            even; outside T >= max >= min >= w: uniform round(target).
/// Reconstructed: C < w (no past slots) and N = 1 (the authors divide by
/// N - 1) give every layer C.
std::vector<std::int64_t> pyramid_budgets(int layers, std::int64_t T, std::int64_t budget, std::int64_t window,
                                          std::int64_t beta, PyramidSchedule schedule);

/// kFloat with a real target T(1-cr) (kvpress's compression_ratio form).
std::vector<std::int64_t> pyramid_budgets_float(int layers, std::int64_t T, double target, std::int64_t window,
                                                double beta);

/// The unrounded kFloat values (before round()), for checking the mean.
std::vector<double> pyramid_budgets_float_raw(int layers, std::int64_t T, double target, std::int64_t window,
                                              double beta);

FamilyInfo pyramidkv_family();

}  // namespace kvscope::ref
