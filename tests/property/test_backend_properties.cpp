// Every method the CPU backend implements, with every preset, through the
// differential harness on random layers (DESIGN.md section 4; docs/verification.md):
// odd sizes, GQA groups 1..8, head dims 64/128 and small ones, budgets around
// the edges, fp32/fp16/bf16 storage. Selections must match up to reported ties,
// numbers must meet the dtype table, and two thread counts must agree bit for bit.
#include <gtest/gtest.h>
#include <rapidcheck.h>

#include "kvscope/core/error.hpp"
#include "kvscope/opt/backend.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/replay/layer_input.hpp"
#include "kvscope/verify/harness.hpp"
#include "kvscope_method_specs.hpp"
#include "kvscope_random_case.hpp"

using namespace kvscope;

namespace {

/// The error kind of running `f`, or nullopt when it returns.
template <class F>
std::optional<ErrorKind> error_of(F&& f, std::string& why) {
  try {
    f();
  } catch (const Error& e) {
    why += std::string(e.what()) + "; ";
    return e.kind();
  }
  return std::nullopt;
}

class BackendProperties : public ::testing::TestWithParam<std::string> {};

TEST_P(BackendProperties, CpuMatchesReference) {
  const std::string spec = GetParam();
  const auto reference = ref::make_method(MethodSpec::parse(spec));
  const auto backend = opt::make_cpu_method(MethodSpec::parse(spec));
  tests::CaseShape shape;
  shape.max_kv_heads = 3;
  shape.head_dims = {2, 6, 8, 64, 128};
  shape.max_tokens = 96;  // past the 32-64 token observation windows, so window scores decide
  shape.dtypes = {DType::kF32, DType::kF16, DType::kBF16};
  const bool ok = rc::check("cpu backend vs reference: " + spec, [&] {
    const tests::Case c = tests::random_case(shape);
    RC_TAG(dtype_name(c.meta.dtype));
    // Both sides refuse the same impossible budgets, with the same kind of
    // error, each on its own (the harness runs both, so its error could be the
    // backend's alone); what neither refuses must verify without an error.
    const opt::LayerStorage storage = opt::pack_layer(c.meta, 0, c.layer);
    std::string why;
    const auto opt_error = error_of([&] { backend->prefill(storage, c.budget); }, why);
    const auto ref_error =
        error_of([&] { reference->prefill(replay::make_layer_input(c.meta, 0, c.layer), c.budget); }, why);
    RC_LOG() << "T=" << c.meta.prompt_len << " d=" << c.meta.head_dim << " heads " << c.meta.q_heads << "/"
             << c.meta.kv_heads << " budget=" << c.budget << ": " << why << "\n";
    RC_ASSERT(opt_error == ref_error);
    if (ref_error) {
      RC_TAG("refused");
      return;
    }
    verify::LayerVerdict v;
    RC_ASSERT(!error_of([&] { v = verify::verify_layer(*reference, *backend, c.meta, 0, c.layer, c.budget); }, why));
    RC_LOG() << v.failure << "\n";
    std::int64_t ties = 0;
    for (const auto& h : v.heads) ties += h.ties;
    if (ties > 0) RC_TAG("ties decided differently");
    RC_ASSERT(v.pass());
    RC_ASSERT(v.deterministic);
  });
  EXPECT_TRUE(ok) << spec;
}

bool has_cpu_backend(const std::string& family) {
  const std::vector<std::string> cpu = opt::cpu_families();
  return std::find(cpu.begin(), cpu.end(), family) != cpu.end();
}

INSTANTIATE_TEST_SUITE_P(CpuMethods, BackendProperties, ::testing::ValuesIn(tests::method_specs(has_cpu_backend)),
                         tests::spec_test_name);

}  // namespace
