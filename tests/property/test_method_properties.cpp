// The three property families, for every registered method and preset
// (DESIGN.md section 4.3), through the replay engine on random small layers:
//  - budget adherence and merge conservation: replay runs the plan checker
//    after prefill and after every decode step (a violation is kInvariant);
//  - attention-output perturbation within the analytic bound, checked by
//    replay on every step, and exactly zero when the budget covers the cache;
//  - determinism: the same inputs give bit-identical records.
// Inputs take values on a coarse grid, a fine range or from a set of special
// values (zeros, tiny, large), so exact ties, near-ties and saturated
// softmaxes are all common. A method added to the registry is covered automatically.
#include <gtest/gtest.h>
#include <rapidcheck.h>

#include <cstring>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/replay/replay.hpp"
#include "kvscope_method_specs.hpp"
#include "kvscope_random_case.hpp"

using namespace kvscope;
using kvscope::tests::Case;
using kvscope::tests::random_case;

namespace {

class Records final : public replay::RecordSink {
 public:
  void on_record(const replay::StepRecord& r) override { all.push_back(r); }
  std::vector<replay::StepRecord> all;
};

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

bool same_records(const std::vector<replay::StepRecord>& a, const std::vector<replay::StepRecord>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const auto &x = a[i].metrics, &y = b[i].metrics;
    if (a[i].slots != b[i].slots || !same_bits(x.rel_l2, y.rel_l2) || !same_bits(x.err, y.err) ||
        !same_bits(x.bound, y.bound) || !same_bits(x.mass_lost, y.mass_lost))
      return false;
  }
  return true;
}

// Every family with its default preset and each named preset.
class MethodProperties : public ::testing::TestWithParam<std::string> {};

TEST_P(MethodProperties, BudgetConservationBoundAndDeterminism) {
  const std::string spec = GetParam();
  const bool ok = rc::check("replay of " + spec + " on a random layer", [&spec] {
    const Case c = random_case();
    replay::ReplayOptions o;
    o.methods = {MethodSpec::parse(spec)};
    o.budgets = {Budget::tokens(c.budget)};
    const replay::LayerSource source = [&c](int) { return c.layer; };
    RC_TAG(c.budget >= c.meta.prompt_len + c.meta.decode_steps ? "budget covers the cache" : "compressing");
    Records first, second;
    try {
      replay::run_replay(c.meta, source, o, &first);
    } catch (const Error& e) {
      // Only a declared impossible budget may stop a run; never a broken law.
      RC_LOG() << "T=" << c.meta.prompt_len << " S=" << c.meta.decode_steps << " budget=" << c.budget << ": "
               << e.what() << "\n";
      RC_ASSERT(e.kind() == ErrorKind::kImpossibleBudget);
      RC_TAG("impossible budget");
      return;
    }
    replay::run_replay(c.meta, source, o, &second);
    RC_ASSERT(same_records(first.all, second.all));
    RC_ASSERT(!first.all.empty());
    if (c.budget >= c.meta.prompt_len + c.meta.decode_steps)
      for (const auto& r : first.all) RC_ASSERT(r.metrics.err == 0.0);
  });
  EXPECT_TRUE(ok) << spec;
}

INSTANTIATE_TEST_SUITE_P(AllMethods, MethodProperties, ::testing::ValuesIn(tests::method_specs()), tests::spec_test_name);

}  // namespace
