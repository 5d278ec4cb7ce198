// Full: the identity plan; its compressed cache is the cache itself, bit for bit.
#include <gtest/gtest.h>

#include "kvscope/reference/plan_apply.hpp"
#include "kvscope/reference/plan_checker.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope_layer.hpp"

using namespace kvscope;

TEST(Full, PlanIsTheIdentityAndTheCacheIsUnchanged) {
  const auto f = tests::random_layer(4, 2, 33, 8, 11);
  const auto m = ref::make_method(MethodSpec::parse("full"));
  const auto plans = m->prefill(f.input, 3).plans;  // the budget is ignored
  ASSERT_EQ(plans.size(), 2u);
  for (std::size_t h = 0; h < plans.size(); ++h) {
    EXPECT_TRUE(ref::check_plan(plans[h], {ref::BudgetLaw::kExact, 33, ref::ConservationLaw::kEviction,
                                           m->protected_tokens(33, 3)}).ok());
    const ref::HeadCache c = ref::apply_plan(plans[h], f.input.k[h], f.input.v[h], 10000.0);
    EXPECT_EQ(c.K, f.input.k[h]);
    EXPECT_EQ(c.V, f.input.v[h]);
  }
  EXPECT_EQ(m->decoder(f.input, {3, 3}), nullptr);
}
