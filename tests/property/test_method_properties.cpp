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

using namespace kvscope;

namespace {

struct Case {
  TraceMeta meta;
  LayerData layer;
  std::int64_t budget = 0;
};

// Values: a coarse grid (exact ties), a fine range (near-ties), or special
// values mixed in (zeros, subnormal-small, large enough to saturate softmax).
enum class Values { kGrid, kFine, kSpecial };

float random_value(Values kind) {
  switch (kind) {
    case Values::kGrid: return static_cast<float>(*rc::gen::inRange(-3, 4)) * 0.5f;
    case Values::kFine: return static_cast<float>(*rc::gen::inRange(-4000, 4001)) / 1000.0f;
    case Values::kSpecial:
      return *rc::gen::element(0.0f, -0.0f, 1e-38f, -1e-38f, 1e-3f, 30.0f, -30.0f, 1.0f, -1.0f);
  }
  return 0.0f;
}

Tensor random_tensor(std::vector<std::int64_t> shape, Values kind) {
  Tensor t(std::move(shape));
  for (float& x : t.data) x = random_value(kind);
  return t;
}

Case random_case() {
  Case c;
  TraceMeta& m = c.meta;
  m.layers = 1;
  m.kv_heads = *rc::gen::inRange(1, 3);
  m.q_heads = m.kv_heads * *rc::gen::inRange(1, 9);  // GQA group sizes 1..8
  m.head_dim = 2 * *rc::gen::inRange(1, 5);
  m.prompt_len = *rc::gen::inRange<std::int64_t>(1, 25);
  m.decode_steps = *rc::gen::inRange<std::int64_t>(1, 5);
  const Values grid = *rc::gen::element(Values::kGrid, Values::kFine, Values::kSpecial);
  const std::int64_t T = m.prompt_len, S = m.decode_steps, d = m.head_dim;
  c.layer.prefill_q = random_tensor({m.q_heads, T, d}, grid);
  c.layer.prefill_k = random_tensor({m.kv_heads, T, d}, grid);
  c.layer.prefill_v = random_tensor({m.kv_heads, T, d}, grid);
  c.layer.decode_q = random_tensor({m.q_heads, S, d}, grid);
  c.layer.decode_k = random_tensor({m.kv_heads, S, d}, grid);
  c.layer.decode_v = random_tensor({m.kv_heads, S, d}, grid);
  // Budgets around the edges: 0, 1, small, about T, and covering T + S.
  c.budget = *rc::gen::oneOf(rc::gen::inRange<std::int64_t>(0, 3), rc::gen::inRange<std::int64_t>(0, T + 1),
                             rc::gen::inRange<std::int64_t>(T - 1, T + S + 2));
  return c;
}

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
std::vector<std::string> all_specs() {
  std::vector<std::string> specs;
  for (const auto& f : ref::method_families()) {
    specs.push_back(f.family);
    for (std::size_t i = 1; i < f.presets.size(); ++i) specs.push_back(f.family + "@" + f.presets[i].name);
  }
  return specs;
}

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

std::string test_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string s = info.param;
  for (char& ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
}

INSTANTIATE_TEST_SUITE_P(AllMethods, MethodProperties, ::testing::ValuesIn(all_specs()), test_name);

}  // namespace
