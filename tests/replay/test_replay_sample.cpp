// End-to-end replay over the bundled sample trace: Full has zero error, the
// checker ran on every plan, StreamingLLM loses mass monotonically in budget,
// and the trace's recorded outputs agree with the reference.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>

#include "kvscope/core/error.hpp"
#include "kvscope/replay/replay.hpp"
#include "kvscope/traces/trace_io.hpp"

using namespace kvscope;

namespace {

std::string sample_path() {
  const char* p = std::getenv("KVSCOPE_SAMPLE_TRACE");
  return p && *p ? p : KVSCOPE_SAMPLE_TRACE;
}

class CountingSink final : public replay::RecordSink {
 public:
  void on_record(const replay::StepRecord& r) override {
    ++count;
    max_slots = std::max(max_slots, r.slots);
  }
  std::int64_t count = 0, max_slots = 0;
};

replay::ReplayResult run(const std::string& methods, const std::string& budgets, CountingSink* sink = nullptr) {
  const traces::TraceReader trace(sample_path());
  replay::ReplayOptions o;
  o.methods = MethodSpec::parse_list(methods);
  for (const char* b : {"50%", "25%"})
    if (budgets.find(b) != std::string::npos) o.budgets.push_back(Budget::parse(b));
  return replay::run_replay(trace, o, sink);
}

}  // namespace

TEST(ReplaySample, FullCacheHasExactlyZeroError) {
  const auto r = run("full", "50%");
  ASSERT_EQ(r.runs.size(), 1u);
  const auto& a = r.runs[0].all;
  EXPECT_GT(a.count, 0);
  EXPECT_EQ(a.max_rel_l2, 0.0);
  EXPECT_EQ(a.max_mass_lost, 0.0);
  EXPECT_NEAR(a.min_cosine, 1.0, 1e-12);  // cosine divides by two norms: not bit-exact
  EXPECT_EQ(r.runs[0].final_kv_bytes, r.runs[0].full_kv_bytes);
}

TEST(ReplaySample, RecordedOutputsMatchTheReference) {
  const auto r = run("full", "50%");
  ASSERT_TRUE(r.self_check.recorded);
  EXPECT_LT(r.self_check.max_rel_l2, 2e-3);  // outputs are stored in fp16
}

TEST(ReplaySample, StreamingLlmObeysItsBudgetAndEveryPlanIsChecked) {
  CountingSink sink;
  const auto r = run("streaming_llm", "25%", &sink);
  const auto& m = r.meta;
  const auto& s = r.runs[0];
  EXPECT_EQ(s.budget_tokens, m.prompt_len / 4);
  EXPECT_EQ(sink.count, std::int64_t{m.layers} * m.q_heads * m.decode_steps);
  EXPECT_LE(sink.max_slots, s.budget_tokens);  // paper mode evicts before attending
  EXPECT_EQ(s.plans_checked, std::int64_t{m.layers} * m.kv_heads * (1 + m.decode_steps));
  EXPECT_GT(s.all.mean_rel_l2(), 0.0);
  EXPECT_GT(s.all.mean_mass_lost(), 0.0);
}

TEST(ReplaySample, MoreBudgetLosesLessMass) {
  // StreamingLLM's kept set at 50% contains the one at 25%, step by step.
  const auto r = run("streaming_llm@kvpress", "50% 25%");
  ASSERT_EQ(r.runs.size(), 2u);
  EXPECT_LT(r.runs[0].all.mean_mass_lost(), r.runs[1].all.mean_mass_lost());
  for (std::size_t s = 0; s < r.runs[0].per_step.size(); ++s)
    EXPECT_LE(r.runs[0].per_step[s].mean_mass_lost(), r.runs[1].per_step[s].mean_mass_lost() + 1e-15) << "step " << s;
}

TEST(ReplaySample, UnknownMethodFailsBeforeReadingData) {
  EXPECT_THROW(run("no_such_method", "50%"), kvscope::Error);
}
