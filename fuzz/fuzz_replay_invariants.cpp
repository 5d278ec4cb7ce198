// Reference invariants on fuzzer-chosen small layers: every registered method
// family and preset, any budget, replayed through replay::run_replay, which
// runs the plan checker and the perturbation bound on every step. A run must
// finish or stop with kImpossibleBudget (or kBadNumber for non-finite input);
// a broken law (kInvariant), any other error, or a non-finite metric is a
// finding. The reference-vs-CPU comparison is fuzz_differential.cpp.
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/replay/replay.hpp"

using namespace kvscope;
using replay::ReplayOptions;

namespace {

// Values: a coarse grid (ties are common, the hard case for selections), or
// arbitrary float bits (NaN, Inf, subnormals, 3e38) in "wild" mode.
float value(FuzzedDataProvider& in, bool wild) {
  if (wild) {
    const auto bits = in.ConsumeIntegral<std::uint32_t>();
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  return static_cast<float>(in.ConsumeIntegralInRange(-8, 8)) * 0.25f;
}

Tensor tensor(FuzzedDataProvider& in, std::vector<std::int64_t> shape, bool wild, bool non_negative = false) {
  Tensor t(std::move(shape));
  for (float& x : t.data) x = non_negative ? std::abs(value(in, wild)) : value(in, wild);
  return t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  const auto& families = ref::method_families();
  const ref::FamilyInfo& family = families[in.ConsumeIntegralInRange<std::size_t>(0, families.size() - 1)];
  MethodSpec spec;
  spec.family = family.family;
  if (!family.presets.empty())
    spec.preset = family.presets[in.ConsumeIntegralInRange<std::size_t>(0, family.presets.size() - 1)].name;

  TraceMeta meta;
  meta.layers = in.ConsumeIntegralInRange(1, 2);
  meta.kv_heads = in.ConsumeIntegralInRange(1, 2);
  meta.q_heads = meta.kv_heads * in.ConsumeIntegralInRange(1, 4);
  meta.head_dim = 2 * in.ConsumeIntegralInRange(1, 4);
  meta.prompt_len = in.ConsumeIntegralInRange(1, 24);
  meta.decode_steps = in.ConsumeIntegralInRange(1, 4);
  meta.has_attn_colsum = in.ConsumeBool();
  const bool wild = in.ConsumeIntegralInRange(0, 7) == 0;
  const std::int64_t T = meta.prompt_len, S = meta.decode_steps, d = meta.head_dim;
  const std::int64_t q = meta.q_heads, kv = meta.kv_heads;

  ReplayOptions options;
  options.methods = {spec};
  options.budgets = {in.ConsumeBool() ? Budget::tokens(in.ConsumeIntegralInRange<std::int64_t>(0, T + S + 2))
                                      : Budget::ratio(in.ConsumeIntegralInRange(1, 100) / 100.0)};

  std::vector<LayerData> layers;
  for (int l = 0; l < meta.layers; ++l) {
    LayerData x{tensor(in, {q, T, d}, wild), tensor(in, {kv, T, d}, wild), tensor(in, {kv, T, d}, wild),
                tensor(in, {q, S, d}, wild), tensor(in, {kv, S, d}, wild), tensor(in, {kv, S, d}, wild), {}, {}};
    if (meta.has_attn_colsum) x.attn_colsum = tensor(in, {q, T}, wild, true);
    layers.push_back(std::move(x));
  }

  try {
    const replay::ReplayResult r = replay::run_replay(
        meta, [&layers](int l) { return layers[static_cast<std::size_t>(l)]; }, options);
    for (const replay::RunSummary& run : r.runs)
      if (!std::isfinite(run.all.sum_rel_l2) || !std::isfinite(run.all.sum_cosine) ||
          !std::isfinite(run.all.sum_mass_lost) || !std::isfinite(run.all.max_bound_ratio)) {
        std::fprintf(stderr, "non-finite metric in %s budget %s\n", run.method.c_str(), run.budget.c_str());
        std::abort();
      }
  } catch (const Error& e) {
    const bool expected = e.kind() == ErrorKind::kImpossibleBudget || (wild && e.kind() == ErrorKind::kBadNumber);
    if (!expected) {
      std::fprintf(stderr, "%s: %s: %s\n", spec.to_string().c_str(), error_kind_name(e.kind()), e.what());
      std::abort();
    }
  }
  return 0;
}
