// The differential harness: tie-aware selection comparison, numeric
// comparison, a sabotaged backend caught, and repro files that read back.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <limits>

#include "commands.hpp"
#include "kvscope/opt/backend.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/traces/repro.hpp"
#include "kvscope/traces/synth.hpp"
#include "kvscope/traces/trace_io.hpp"
#include "kvscope/verify/harness.hpp"

using namespace kvscope;

namespace {

TEST(CompareSelection, IdenticalPlansPass) {
  const std::vector<std::int64_t> kept = {0, 2, 3};
  const verify::SelectionDiff d = verify::compare_selection(Plan::keep(5, kept), Plan::keep(5, kept), nullptr, {}, 0);
  EXPECT_TRUE(d.pass());
  EXPECT_TRUE(d.plans_equal);
  EXPECT_EQ(d.jaccard, 0.0);
}

TEST(CompareSelection, SwapAtTheBoundaryIsATieAndFarFromItAMismatch) {
  ref::VecX s(6);
  s << 0.9, 0.1, 0.5, 0.5 + 1e-9, 0.05, 0.7;  // reference keeps {0, 3, 5} at k = 3
  const std::vector<std::int64_t> ref_kept = {0, 3, 5}, near = {0, 2, 5}, far = {0, 3, 4};
  const verify::SelectionDiff tie = verify::compare_selection(Plan::keep(6, ref_kept), Plan::keep(6, near), &s, {}, 1e-6);
  EXPECT_TRUE(tie.pass());
  EXPECT_EQ(tie.ties, 2);
  EXPECT_NEAR(tie.jaccard, 0.5, 1e-12);  // |{0,5}| / |{0,2,3,5}|
  const verify::SelectionDiff bad = verify::compare_selection(Plan::keep(6, ref_kept), Plan::keep(6, far), &s, {}, 1e-6);
  EXPECT_FALSE(bad.pass());
  EXPECT_NE(bad.first_mismatch.find("token"), std::string::npos);
  // Without scores every difference is a mismatch.
  EXPECT_FALSE(verify::compare_selection(Plan::keep(6, ref_kept), Plan::keep(6, near), nullptr, {}, 1e-6).pass());
}

TEST(CompareSelection, SameTokensInDifferentSlotsIsAMismatch) {
  Plan a = Plan::keep(3, std::vector<std::int64_t>{0, 1});
  Plan b = a;
  b.coef_v[1] = 0.5;
  EXPECT_FALSE(verify::compare_selection(a, b, nullptr, {}, 0).pass());
}

TEST(CompareNumbers, NaNNeverPassesAndTolerancesBite) {
  const Tolerance tol = tolerance(DType::kF16);
  const std::vector<double> ref = {1.0, 2.0, 3.0}, naive = ref;
  EXPECT_TRUE(verify::compare_numbers(ref, std::vector<float>{1.0f, 2.0f, 3.0f}, naive, tol).pass);
  const verify::NumberDiff nan = verify::compare_numbers(
      ref, std::vector<float>{1.0f, std::numeric_limits<float>::quiet_NaN(), 3.0f}, naive, tol);
  EXPECT_FALSE(nan.pass);
  EXPECT_EQ(nan.non_finite, 1);
  EXPECT_FALSE(verify::compare_numbers(ref, std::vector<float>{1.0f, 2.1f, 3.0f}, naive, tol).pass);
  // Within the dtype tolerance but far above k * naive + floor when the naive result is exact.
  EXPECT_FALSE(verify::compare_numbers(ref, std::vector<float>{1.0f, 2.0f, 3.002f}, naive, tol).pass);
}

// A tensor the storage dtype cannot hold (fp16 flushes 6e-13 to zero): the
// reference rounded to it is off by 100%, so no fp16 cache can meet the
// dtype's tolerance; it is held to k * naive + floor and the naive cosine
// alone. A random weightedkv case (T 2, d 2, values near 1e-38) found this.
// Output far from the reference still fails, and a representable tensor is
// still held to the tolerance.
TEST(CompareNumbers, TensorsBelowTheDtypesRangeAreHeldToTheNaiveBound) {
  const Tolerance tol = tolerance(DType::kF16);
  const std::vector<double> tiny = {6.13e-13, 6.13e-13}, flushed = {0.0, 0.0};
  const verify::NumberDiff zero = verify::compare_numbers(tiny, std::vector<float>{0.0f, 0.0f}, flushed, tol);
  EXPECT_TRUE(zero.pass) << zero.why;
  EXPECT_EQ(zero.naive_rel_l2, 1.0);
  EXPECT_FALSE(verify::compare_numbers(tiny, std::vector<float>{1e-9f, 0.0f}, flushed, tol).pass);
  EXPECT_FALSE(verify::compare_numbers(tiny, std::vector<float>{-6e-13f, -6e-13f}, flushed, tol).pass);
  // Representable (naive off by 8.0e-4, within fp16's 1e-3): off by 1.3e-3
  // is within k * naive + floor (1.6e-3) but over the tolerance, and fails.
  const std::vector<double> ref = {1.0, 2.0}, naive = {1.0, 2.0 + 1.79e-3};
  const verify::NumberDiff coarse = verify::compare_numbers(ref, std::vector<float>{1.0f, 2.0f + 2.9e-3f}, naive, tol);
  EXPECT_LT(coarse.naive_rel_l2, tol.rel_l2);
  EXPECT_LT(coarse.rel_l2, coarse.bound);
  EXPECT_FALSE(coarse.pass) << coarse.rel_l2;
}

/// A backend that keeps the reference-worst candidate instead of the best one: a real bug.
class Sabotaged final : public opt::BackendMethod {
 public:
  explicit Sabotaged(std::unique_ptr<opt::BackendMethod> inner) : inner_(std::move(inner)) {}
  ref::LayerPlans prefill(const opt::LayerStorage& in, std::int64_t budget) const override {
    ref::LayerPlans p = inner_->prefill(in, budget);
    const ref::VecX s = inner_->scorer()->score(in, budget).to_reference().per_kv_head[0];
    std::vector<std::int64_t> kept(p.plans[0].token.begin(), p.plans[0].token.end());
    const auto best = std::max_element(kept.begin(), kept.end(), [&](auto a, auto b) { return s[a] < s[b]; });
    std::int64_t worst = -1;
    for (std::int64_t j = 0; j < s.size(); ++j)
      if (std::find(kept.begin(), kept.end(), j) == kept.end() && (worst < 0 || s[j] < s[worst])) worst = j;
    *best = worst;
    std::sort(kept.begin(), kept.end());
    p.plans[0] = Plan::keep(in.shape.tokens, kept);
    return p;
  }

 private:
  std::unique_ptr<opt::BackendMethod> inner_;
};

traces::SynthConfig small_trace() {
  traces::SynthConfig c;
  c.layers = 1;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.head_dim = 16;
  c.prompt = 40;
  c.decode = 2;
  return c;
}

TEST(VerifyLayer, RealBackendPassesAndASabotagedOneIsCaught) {
  const traces::SynthConfig c = small_trace();
  const LayerData layer = traces::synth_layer(c, 0);
  const MethodSpec spec = MethodSpec::parse("knorm");
  const auto reference = ref::make_method(spec);
  const verify::LayerVerdict good = verify::verify_layer(*reference, *opt::make_cpu_method(spec), traces::synth_meta(c), 0, layer, 20);
  EXPECT_TRUE(good.pass()) << good.failure;
  EXPECT_TRUE(good.deterministic);
  const Sabotaged bad(opt::make_cpu_method(spec));
  const verify::LayerVerdict v = verify::verify_layer(*reference, bad, traces::synth_meta(c), 0, layer, 20);
  EXPECT_FALSE(v.pass());
  EXPECT_NE(v.failure.find("kv head 0 selection"), std::string::npos) << v.failure;
  // The evidence a repro file carries: both sides' kept tokens differ.
  std::vector<double> ref_tokens, opt_tokens;
  for (const auto& [name, values] : v.evidence) {
    if (name == "reference_tokens_kv0") ref_tokens = values;
    if (name == "backend_tokens_kv0") opt_tokens = values;
  }
  EXPECT_FALSE(ref_tokens.empty());
  EXPECT_NE(ref_tokens, opt_tokens);
}

TEST(Repro, WritesAOneLayerTraceThatReadsBackWithItsCase) {
  const traces::SynthConfig c = small_trace();
  const LayerData layer = traces::synth_layer(c, 0);
  const std::string path = (std::filesystem::temp_directory_path() / "kvscope_repro_test.h5").string();
  TraceMeta meta = traces::synth_meta(c);
  meta.layers = 32;
  traces::write_repro(path, meta, layer, {"snapkv@kvpress", "25%", "cpu", "why", 7, 32, 42}, {{"ref_k", {1.0, 2.0}}});
  const auto info = traces::read_repro_info(path);
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->method, "snapkv@kvpress");
  EXPECT_EQ(info->budget, "25%");
  EXPECT_EQ(info->layer, 7);
  EXPECT_EQ(info->layers, 32);
  EXPECT_EQ(info->seed, 42);
  const traces::TraceReader r(path);
  EXPECT_EQ(r.meta().layers, 1);
  EXPECT_EQ(r.read_layer(0).prefill_k.data, layer.prefill_k.data);
  // `kvscope verify REPRO` replays the case it names (layer 7 of 32 for the
  // schedule-dependent methods) and passes for a correct backend.
  {
    CLI::App app;
    cli::Runner run;
    cli::add_commands(app, run);
    // CLI11 parses a vector back to front: `verify PATH --repro-dir DIR`.
    std::vector<std::string> args = {(std::filesystem::temp_directory_path() / "kvscope_repro_dir").string(),
                                     "--repro-dir", path, "verify"};
    app.parse(args);
    testing::internal::CaptureStdout();
    EXPECT_NO_THROW(run());
    const std::string out = testing::internal::GetCapturedStdout();
    EXPECT_NE(out.find("snapkv@kvpress"), std::string::npos) << out;
    EXPECT_NE(out.find("PASS"), std::string::npos) << out;
  }
  std::filesystem::remove(path);
  // An ordinary trace has no repro group.
  EXPECT_FALSE(traces::read_repro_info(KVSCOPE_SAMPLE_TRACE).has_value());
}

}  // namespace
