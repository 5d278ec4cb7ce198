// The differential target (DESIGN.md section 4): fuzzer-chosen small layers
// through the reference and the CPU backend via verify::verify_layer, for every
// family the backend implements, in every storage dtype. Selections must agree
// up to ties, numbers within the tolerance table, and 1 vs 2 threads bit for
// bit; both sides must refuse the same impossible budgets. Anything else —
// a failed verdict, a crash, a sanitizer report, an unexpected error — is a
// finding (docs/robustness.md).
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <vector>

#include "kvscope/core/error.hpp"
#include "kvscope/opt/backend.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/verify/harness.hpp"

using namespace kvscope;

namespace {

// A coarse grid (exact ties, the hard case for selections) or a fine one (near-ties).
Tensor tensor(FuzzedDataProvider& in, std::vector<std::int64_t> shape, bool coarse, DType dtype) {
  Tensor t(std::move(shape));
  for (float& x : t.data)
    x = round_to_dtype(coarse ? static_cast<float>(in.ConsumeIntegralInRange(-8, 8)) * 0.25f
                              : static_cast<float>(in.ConsumeIntegralInRange(-3000, 3000)) / 997.0f,
                       dtype);
  return t;
}

[[noreturn]] void finding(const std::string& spec, const std::string& what) {
  std::fprintf(stderr, "differential finding (%s): %s\n", spec.c_str(), what.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  static const std::vector<std::string> families = opt::cpu_families();
  const std::string& family = families[in.ConsumeIntegralInRange<std::size_t>(0, families.size() - 1)];
  const ref::ResolvedSpec resolved = ref::resolve_spec(MethodSpec::parse(family));
  MethodSpec spec = MethodSpec::parse(family);
  const auto& presets = resolved.family->presets;
  if (!presets.empty()) spec.preset = presets[in.ConsumeIntegralInRange<std::size_t>(0, presets.size() - 1)].name;

  TraceMeta meta;
  meta.layers = 1;
  meta.dtype = in.PickValueInArray({DType::kF32, DType::kF16, DType::kBF16});
  meta.kv_heads = in.ConsumeIntegralInRange(1, 2);
  meta.q_heads = meta.kv_heads * in.ConsumeIntegralInRange(1, 4);
  meta.head_dim = in.PickValueInArray({2, 4, 8, 16});
  meta.prompt_len = in.ConsumeIntegralInRange(1, 80);
  meta.decode_steps = 1;
  const std::int64_t T = meta.prompt_len, d = meta.head_dim, q = meta.q_heads, kv = meta.kv_heads;
  const std::int64_t budget = in.ConsumeIntegralInRange<std::int64_t>(0, T + 2);
  const bool coarse = in.ConsumeBool();
  LayerData layer{tensor(in, {q, T, d}, coarse, meta.dtype), tensor(in, {kv, T, d}, coarse, meta.dtype),
                  tensor(in, {kv, T, d}, coarse, meta.dtype), tensor(in, {q, 1, d}, coarse, meta.dtype),
                  tensor(in, {kv, 1, d}, coarse, meta.dtype), tensor(in, {kv, 1, d}, coarse, meta.dtype), {}, {}};

  const auto reference = ref::make_method(spec);
  const auto backend = opt::make_cpu_method(spec);
  std::optional<ErrorKind> opt_error, ref_error;
  try {
    backend->prefill(opt::pack_layer(meta, 0, layer), budget);
  } catch (const Error& e) {
    opt_error = e.kind();
  }
  verify::VerifyOptions options;
  options.threads = 2;
  try {
    const verify::LayerVerdict v = verify::verify_layer(*reference, *backend, meta, 0, layer, budget, options);
    if (!v.pass()) finding(spec.to_string(), v.failure);
  } catch (const Error& e) {
    ref_error = e.kind();
    if (e.kind() != ErrorKind::kImpossibleBudget) finding(spec.to_string(), e.what());
  }
  if (opt_error != ref_error) finding(spec.to_string(), "the backend and the reference disagree on refusing the budget");
  return 0;
}
