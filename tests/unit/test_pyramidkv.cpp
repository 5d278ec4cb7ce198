// PyramidKV: the two budget schedules reproduce the numbers worked out in
// research/baselines_kvpress.md A.4 (integer overshoot, kvpress mean, guard
// fallback, first/last layer), budgets are non-increasing and within (0, T],
// and each layer's plans are SnapKV's at that layer's budget.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <numeric>

#include "kvscope/reference/methods/pyramidkv.hpp"
#include "kvscope/reference/plan_checker.hpp"
#include "snapkv_test_support.hpp"

using namespace kvscope;
using namespace kvscope::tests::snap;
using ref::PyramidSchedule;

namespace {

template <class V>
double mean_of(const V& v) {
  return std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

}  // namespace

TEST(PyramidKV, IntegerScheduleOvershootsItsTarget) {
  // w = 32, N = 32, L = 8000: min = 128//20 = 6, max = 250, steps = 244//31 = 7.
  const auto b160 = ref::pyramid_budgets(32, 8000, 160, 32, 20, PyramidSchedule::kInteger);
  EXPECT_EQ(b160.front(), 250 + 32);
  EXPECT_EQ(b160.back(), 250 - 31 * 7 + 32);
  EXPECT_DOUBLE_EQ(mean_of(b160), 173.5);
  EXPECT_DOUBLE_EQ(mean_of(ref::pyramid_budgets(32, 8000, 2048, 32, 20, PyramidSchedule::kInteger)), 2057.5);
}

TEST(PyramidKV, IntegerScheduleBranches) {
  // L < C: no compression; C <= L < 2(C - w): uniform SnapKV (KVCF #6, #17).
  for (std::int64_t l : {1, 100, 159})
    EXPECT_EQ(ref::pyramid_budgets(8, l, 160, 32, 20, PyramidSchedule::kInteger), std::vector<std::int64_t>(8, l));
  for (std::int64_t l : {160, 200, 255})
    EXPECT_EQ(ref::pyramid_budgets(8, l, 160, 32, 20, PyramidSchedule::kInteger), std::vector<std::int64_t>(8, 160));
  // L = 260 >= 256: pyramid with the clip max = L - w = 228, min = 256 - 228 = 28, steps = 200//7 = 28.
  const auto clipped = ref::pyramid_budgets(8, 260, 160, 32, 20, PyramidSchedule::kInteger);
  EXPECT_EQ(clipped.front(), 228 + 32);
  EXPECT_EQ(clipped.back(), 228 - 7 * 28 + 32);
  // Reconstructed: no past slots (C < w) or one layer: every layer gets C.
  EXPECT_EQ(ref::pyramid_budgets(4, 1000, 10, 32, 20, PyramidSchedule::kInteger), std::vector<std::int64_t>(4, 10));
  EXPECT_EQ(ref::pyramid_budgets(1, 1000, 100, 32, 20, PyramidSchedule::kInteger), std::vector<std::int64_t>(1, 100));
}

TEST(PyramidKV, KvpressScheduleNumbers) {
  const auto half = ref::pyramid_budgets_float(32, 4096, 4096 * (1 - 0.5), 64, 20);
  EXPECT_EQ(half.front(), 3994);
  EXPECT_EQ(half.back(), 102);
  // cr = 0.9: min = 20.48 < w = 64, the guard falls back to uniform round(409.6).
  EXPECT_EQ(ref::pyramid_budgets_float(32, 4096, 4096 * (1 - 0.9), 64, 20), std::vector<std::int64_t>(32, 410));
  // Python round() is half to even: 2.5 -> 2 (uniform fallback keeps the target).
  EXPECT_EQ(ref::pyramid_budgets_float(2, 100, 2.5, 64, 20), std::vector<std::int64_t>(2, 2));
  EXPECT_EQ(ref::pyramid_budgets_float(2, 100, 3.5, 64, 20), std::vector<std::int64_t>(2, 4));
}

TEST(PyramidKV, KvpressMeanIsTheTarget) {
  // kvpress tests/presses/test_pyramidkv_press.py's sweep.
  for (int N : {32, 64, 128})
    for (double cr : {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8})
      for (std::int64_t L : {1024, 2048, 4096, 8192}) {
        const double target = static_cast<double>(L) * (1 - cr);
        const auto raw = ref::pyramid_budgets_float_raw(N, L, target, 64, 20);
        EXPECT_NEAR(mean_of(raw), target, 1e-3) << N << " " << cr << " " << L;
        const auto rounded = ref::pyramid_budgets_float(N, L, target, 64, 20);
        EXPECT_LE(std::abs(mean_of(rounded) - target), 0.5) << N << " " << cr << " " << L;
        EXPECT_GE(rounded.front(), rounded.back());
      }
}

RC_GTEST_PROP(PyramidKV, BudgetsNonIncreasingPositiveAndBoundedByThePrompt, ()) {
  const int N = *rc::gen::inRange(1, 129);
  const auto T = *rc::gen::inRange<std::int64_t>(1, 20000);
  const auto C = *rc::gen::inRange<std::int64_t>(1, T + 50);
  const auto w = *rc::gen::inRange<std::int64_t>(1, 129);  // w = 0 lets the last layer keep 0 (the formula's)
  const auto beta = *rc::gen::inRange<std::int64_t>(1, 41);
  for (const auto schedule : {PyramidSchedule::kInteger, PyramidSchedule::kFloat}) {
    const auto b = ref::pyramid_budgets(N, T, C, w, beta, schedule);
    RC_ASSERT(b.size() == static_cast<std::size_t>(N));
    for (std::size_t l = 0; l < b.size(); ++l) {
      RC_ASSERT(b[l] > 0);
      RC_ASSERT(b[l] <= T);
      if (l > 0) RC_ASSERT(b[l] <= b[l - 1]);
    }
    const double over = mean_of(b) - static_cast<double>(std::min(C, T));
    if (schedule == PyramidSchedule::kInteger) {
      // The floored step only ever raises the mean, by less than (N - 1)/2.
      RC_ASSERT(over >= 0.0);
      RC_ASSERT(over < std::max(1.0, (N - 1) / 2.0));
    } else {
      RC_ASSERT(std::abs(over) <= 0.5);
    }
  }
}

TEST(PyramidKV, EachLayerIsSnapKVAtItsOwnBudget) {
  for (const std::string preset : {"paper", "kvpress"}) {
    auto f = tests::random_layer(4, 2, 300, 8, 50);
    f.meta->layers = 4;
    const auto m = make("pyramidkv@" + preset);
    const auto sched = ref::pyramid_budgets(4, 300, 160, preset == "paper" ? 32 : 64, 20,
                                            preset == "paper" ? PyramidSchedule::kInteger : PyramidSchedule::kFloat);
    EXPECT_GT(sched.front(), sched.back()) << preset;
    std::int64_t total = 0;
    for (int l = 0; l < 4; ++l) {
      f.input.layer = l;
      const ref::LayerPlans out = m->prefill(f.input, 160);
      const auto b = sched[static_cast<std::size_t>(l)];
      EXPECT_EQ(out.head_budgets, std::vector<std::int64_t>(2, b));
      EXPECT_TRUE(ref::check_allocation(out.head_budgets, 160, m->laws().allocation).ok());
      const auto snap = make("snapkv@" + preset)->prefill(f.input, b).plans;
      for (std::size_t h = 0; h < out.plans.size(); ++h) {
        EXPECT_EQ(out.plans[h].token, snap[h].token) << preset << " layer " << l;
        EXPECT_TRUE(ref::check_plan(out.plans[h], {ref::BudgetLaw::kExact, b, ref::ConservationLaw::kEviction,
                                                   m->protected_tokens(300, b)}).ok());
        total += out.plans[h].slots();
      }
    }
    // Integer: C - w = 128, min 6, max 250, steps 244//3 = 81: 282 201 120 39 (mean 160.5 > 160).
    // Float: max 312 clipped to T - w = 236, min 320 - 236 = 84, steps 50.67: 236 185 135 84 (mean 160).
    const std::vector<std::int64_t> want = preset == "paper" ? std::vector<std::int64_t>{282, 201, 120, 39}
                                                             : std::vector<std::int64_t>{236, 185, 135, 84};
    EXPECT_EQ(sched, want);
    EXPECT_EQ(total, 2 * (want[0] + want[1] + want[2] + want[3]));
  }
}

TEST(PyramidKV, ConfigurationErrors) {
  for (const char* bad : {"pyramidkv:beta=0", "pyramidkv:schedule=cubic", "pyramidkv:gqa=query-head", "pyramidkv@nope"})
    EXPECT_EQ(kind_of([&] { make(bad); }), ErrorKind::kUsage) << bad;
  auto f = tests::random_layer(2, 1, 100, 4, 51);
  f.meta->layers = 2;
  f.input.layer = 2;  // outside the trace
  EXPECT_EQ(kind_of([&] { make("pyramidkv")->prefill(f.input, 50); }), ErrorKind::kInternal);
  f.input.layer = 0;
  EXPECT_EQ(kind_of([&] { make("pyramidkv")->prefill(f.input, 20); }), ErrorKind::kImpossibleBudget);  // < window
  EXPECT_EQ(make("pyramidkv")->scorer(), nullptr);  // a per-layer budget is not a scorer for AdaKV
  EXPECT_EQ(make("pyramidkv")->laws().allocation, ref::AllocationLaw::kPerLayer);
}
