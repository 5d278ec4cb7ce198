// StreamingLLM: kept set depends only on (n, sinks, recent) and is the same for
// every head; presets; budget edge cases; decode eviction; re-rotation.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/streaming_llm.hpp"
#include "kvscope/reference/plan_apply.hpp"
#include "kvscope/reference/plan_checker.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope_layer.hpp"
#include "kvscope_method_test.hpp"

using namespace kvscope;

namespace {

using tests::make;
using tests::kind_of;

std::vector<std::int64_t> kept_of(const Plan& p) { return p.token; }

}  // namespace

RC_GTEST_PROP(StreamingLLM, KeptSetDependsOnlyOnSizesAndIsSharedByHeads, ()) {
  const auto n = *rc::gen::inRange<std::int64_t>(1, 200);
  const auto sinks = *rc::gen::inRange<std::int64_t>(0, 8);
  const auto budget = *rc::gen::inRange<std::int64_t>(sinks + 1, 260);
  const auto kv = *rc::gen::inRange(1, 4);
  const auto seed = *rc::gen::arbitrary<std::uint32_t>();
  const auto m = make("streaming_llm@kvpress:sinks=" + std::to_string(sinks));
  const auto a = tests::random_layer(kv, kv, n, 4, seed), b = tests::random_layer(kv, kv, n, 4, seed + 1);
  const auto pa = m->prefill(a.input, budget).plans, pb = m->prefill(b.input, budget).plans;
  RC_ASSERT(pa.size() == static_cast<std::size_t>(kv));
  const auto expected = ref::streaming_kept(n, sinks, budget - sinks);
  for (std::size_t h = 0; h < pa.size(); ++h) {
    RC_ASSERT(kept_of(pa[h]) == expected);
    RC_ASSERT(kept_of(pb[h]) == expected);  // content-independent
  }
  RC_ASSERT(static_cast<std::int64_t>(expected.size()) == std::min(n, budget));
  const auto laws = m->laws();
  RC_ASSERT(ref::check_plan(pa[0], {laws.prefill_budget, budget, laws.conservation, m->protected_tokens(n, budget)}).ok());
}

TEST(StreamingLLM, KeepsSinksAndRecentExactly) {
  EXPECT_EQ(ref::streaming_kept(10, 2, 3), (std::vector<std::int64_t>{0, 1, 7, 8, 9}));
  EXPECT_EQ(ref::streaming_kept(4, 2, 3), (std::vector<std::int64_t>{0, 1, 2, 3}));  // n <= budget: identity
  EXPECT_EQ(ref::streaming_kept(10, 0, 3), (std::vector<std::int64_t>{7, 8, 9}));
  EXPECT_EQ(ref::streaming_kept(10, 4, 0), (std::vector<std::int64_t>{0, 1, 2, 3}));
}

TEST(StreamingLLM, BudgetCoveringTheCacheIsTheIdentity) {
  const auto f = tests::random_layer(2, 2, 30, 4, 1);
  for (const char* spec : {"streaming_llm", "streaming_llm@kvpress", "streaming_llm@kvcache-factory"})
    for (const Plan& p : make(spec)->prefill(f.input, 64).plans) EXPECT_EQ(p.token, Plan::identity(30).token) << spec;
}

TEST(StreamingLLM, PresetsPinPositionsAndSplit) {
  const auto f = tests::random_layer(1, 1, 100, 4, 2);
  const Plan paper = make("streaming_llm@paper")->prefill(f.input, 10).plans[0];
  EXPECT_EQ(paper.positions, PositionMode::kRerotated);
  EXPECT_EQ(paper.position, (std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(paper.token, (std::vector<std::int64_t>{0, 1, 2, 3, 94, 95, 96, 97, 98, 99}));
  const Plan kvpress = make("streaming_llm@kvpress")->prefill(f.input, 10).plans[0];
  EXPECT_EQ(kvpress.positions, PositionMode::kOriginal);
  EXPECT_EQ(kvpress.position, kvpress.token);
  const Plan kvcf = make("streaming_llm@kvcache-factory")->prefill(f.input, 40).plans[0];
  EXPECT_EQ(kvcf.token.front(), 0);
  EXPECT_EQ(kvcf.token[7], 7);      // the prefix is 40 - 32 = 8 tokens
  EXPECT_EQ(kvcf.token[8], 68);     // then the last 32
  EXPECT_EQ(make("streaming_llm@kvpress")->decoder(f.input, {10}), nullptr);  // prompt only
  EXPECT_NE(make("streaming_llm@paper")->decoder(f.input, {10}), nullptr);
}

TEST(StreamingLLM, ImpossibleBudgetsAreNamedErrors) {
  const auto f = tests::random_layer(1, 1, 100, 4, 3);
  // Paper mode needs a recent slot for the decoded token.
  EXPECT_EQ(kind_of([&] { make("streaming_llm")->prefill(f.input, 4); }), ErrorKind::kImpossibleBudget);
  EXPECT_EQ(kind_of([&] { make("streaming_llm")->prefill(f.input, 0); }), ErrorKind::kImpossibleBudget);
  EXPECT_EQ(kind_of([&] { make("streaming_llm@kvcache-factory")->prefill(f.input, 20); }), ErrorKind::kImpossibleBudget);
  EXPECT_EQ(kind_of([&] { make("streaming_llm:sinks=3:recent=5")->prefill(f.input, 7); }), ErrorKind::kImpossibleBudget);
  // Prompt-only compression may keep just the sinks.
  EXPECT_EQ(make("streaming_llm@kvpress")->prefill(f.input, 4).plans[0].slots(), 4);
  EXPECT_EQ(make("streaming_llm@kvpress:sinks=0")->prefill(f.input, 0).plans[0].slots(), 0);
}

TEST(StreamingLLM, BadConfigurationIsAUsageError) {
  for (const char* bad : {"streaming_llm@nope", "streaming_llm:bogus=1", "streaming_llm:sinks=-1",
                          "streaming_llm:sinks=x", "streaming_llm:positions=sideways", "streaming_llm:sinks=auto",
                          "no_such_method"})
    EXPECT_EQ(kind_of([&] { make(bad); }), ErrorKind::kUsage) << bad;
}

TEST(StreamingLLM, DecodeEvictsTheOldestNonSinkBeforeAttending) {
  const auto f = tests::random_layer(2, 1, 12, 4, 4);
  const auto m = make("streaming_llm@paper:sinks=2");
  auto policy = m->decoder(f.input, {6});
  std::vector<ref::HeadCache> heads(1);
  heads[0].plan = m->prefill(f.input, 6).plans[0];  // tokens 0 1 8 9 10 11
  append_token(heads[0].plan);                // + token 12: 7 slots
  std::vector<ref::VecX> q(2, ref::VecX::Zero(4));
  const ref::DecodeStep step{0, 12, &heads, &q};
  const auto plans = policy->before_attend(step);
  ASSERT_TRUE(plans[0].has_value());
  const Plan next = compose(*plans[0], heads[0].plan);
  EXPECT_EQ(next.token, (std::vector<std::int64_t>{0, 1, 9, 10, 11, 12}));
  EXPECT_EQ(next.position, (std::vector<std::int64_t>{0, 1, 2, 3, 4, 5}));  // re-rotated to cache slots
  EXPECT_TRUE(ref::check_plan(next, {m->laws().decode_budget, 6, m->laws().conservation, m->protected_tokens(13, 6)}).ok());
}

TEST(StreamingLLM, RerotatedKeysEqualKeysRotatedAtTheirCacheIndex) {
  // Keys k_j = R(j) u_j; after re-rotation slot i must hold R(i) u_token(i).
  const double theta = 10000.0;
  const auto f = tests::random_layer(1, 1, 40, 8, 5);
  const ref::MatX& U = f.input.k[0];
  ref::MatX K(U.rows(), U.cols());
  for (Eigen::Index j = 0; j < U.rows(); ++j)
    K.row(j) = ref::rope_rotate(U.row(j).transpose(), static_cast<double>(j), theta).transpose();
  const Plan p = make("streaming_llm@paper")->prefill(f.input, 12).plans[0];
  const ref::HeadCache c = ref::apply_plan(p, K, f.input.v[0], theta);
  for (std::int64_t i = 0; i < p.slots(); ++i) {
    const ref::VecX want = ref::rope_rotate(U.row(p.token[static_cast<std::size_t>(i)]).transpose(), static_cast<double>(i), theta);
    EXPECT_LT((c.K.row(i).transpose() - want).norm(), 1e-9) << "slot " << i;
    EXPECT_EQ(c.V.row(i), f.input.v[0].row(p.token[static_cast<std::size_t>(i)]));
  }
}
