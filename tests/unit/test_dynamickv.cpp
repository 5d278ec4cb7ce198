// DynamicKV: the budget schedule reproduces dynamic_v11.py's arithmetic
// (hand-worked updates, the duplicate-window quirk, L not divisible by 4,
// r_min not enforced, the zero guard), its sums hold on random integer scores,
// its bucketed prefix top-k counts equal a sort's,
// and the method keeps the window plus each kv head's top pooled-score
// tokens, end to end through the replay engine's coupling pass.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <span>
#include <thread>
#include <vector>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/dynamickv.hpp"
#include "kvscope/reference/methods/dynamickv_pass.hpp"
#include "kvscope/reference/methods/dynamickv_topk.hpp"
#include "kvscope/reference/plan_checker.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/replay/replay.hpp"
#include "kvscope_layer.hpp"
#include "kvscope_method_test.hpp"

using namespace kvscope;
using ref::DynamicKVMode;
using ref::DynamicKVScheduleConfig;
using ref::VecX;

namespace {

using tests::make;

VecX constant(std::int64_t n, double x) { return VecX::Constant(n, x); }

// scores[l][0] = v[l] repeated Lp times (one head).
std::vector<std::vector<VecX>> one_head(const std::vector<double>& v, std::int64_t Lp) {
  std::vector<std::vector<VecX>> s;
  for (double x : v) s.push_back({constant(Lp, x)});
  return s;
}

DynamicKVScheduleConfig config(int L, std::int64_t w, std::int64_t b, double r_max, DynamicKVMode mode) {
  DynamicKVScheduleConfig c;
  c.layers = L;
  c.window = w;
  c.base = b;
  c.r_max = r_max;
  c.interval = 4;
  c.mode = mode;
  return c;
}

std::int64_t sum(const std::vector<std::int64_t>& v) { return std::accumulate(v.begin(), v.end(), std::int64_t{0}); }

}  // namespace

TEST(DynamicKV, PythonFloorDivision) {
  EXPECT_EQ(ref::python_floordiv(7.0, 2.0), 3.0);
  EXPECT_EQ(ref::python_floordiv(-7.0, 2.0), -4.0);
  EXPECT_EQ(ref::python_floordiv(1.0, 0.1), 9.0);  // Python: 1 // 0.1 == 9.0, not floor(1 / 0.1) == 10
  EXPECT_EQ(ref::python_floordiv(5.0, 0.5), 10.0);
  EXPECT_EQ(ref::python_floordiv(3.0, 0.25), 12.0);
}

TEST(DynamicKV, HandWorkedFourLayerUpdate) {
  // L = 4, one head, Lp = 4, b = 2, r_max 10: Bmax = min(20, 4) = 4. tau = 8 of 16 scores:
  // layer 0's four 9s, then the zeros with the lowest flat index (layer 1). counts // 4 = [1, 1, 0, 0];
  // last layer, sum 2 != H Lp = 4: c_3 += 8 // 4 - 2 = 0. t = [.5, .5, 0, 0], u = [2, 2, 0, 0],
  // rho = 4 / 8, B = [4, 4, 0, 0]: layers 2 and 3 keep no past token (r_min 0.1 is not enforced).
  const auto s = ref::dynamickv_schedule(one_head({9, 0, 0, 0}, 4), config(4, 2, 2, 10, DynamicKVMode::kBitFaithful));
  EXPECT_EQ(s.bmax, 4);
  ASSERT_EQ(s.updates.size(), 1u);
  const auto& u = s.updates[0];
  EXPECT_EQ(u.topk, 8);
  EXPECT_EQ(u.counts, (std::vector<std::int64_t>{1, 1, 0, 0}));
  EXPECT_EQ(u.scaled, (std::vector<std::int64_t>{2, 2, 0, 0}));
  EXPECT_DOUBLE_EQ(u.rho, 0.5);
  EXPECT_EQ(u.budgets, (std::vector<std::int64_t>{4, 4, 0, 0}));
  EXPECT_EQ(sum(u.budgets), 2 * 4);
  EXPECT_EQ(s.prefix, (std::vector<std::int64_t>{4, 4, 0, 0}));
  EXPECT_EQ(s.duplicates, (std::vector<std::int64_t>{0, 0, 0, 0}));
}

TEST(DynamicKV, DuplicateWindowQuirkAndIntendedMode) {
  // L = 8, Lp = 10, w = 2, b = 2, r_max 2: Bmax = 4. Layer 0 scores 5, the rest 0.
  // Update after layer 3: tau = 8, all from layer 0: counts [2,0,0,0], u = [4,0,0,0], rho = 4/16,
  // B = [16,0,0,0] -> clipped to Lp = 10 > the 4 + 2 entries layer 0 holds: the slice takes its
  // window too and the window is appended again (2 duplicates).
  // Update after layer 7: tau = 16: layer 0's 10 entries and 6 zeros of layer 1; counts // 8 =
  // [1,0,...,0]; last layer: c_7 += 16 // 8 - 1 -> [1,0,0,0,0,0,0,1]; u = [2,...,2], rho = 4/16,
  // B = [8,0,0,0,0,0,0,8].
  const auto scores = one_head({5, 0, 0, 0, 0, 0, 0, 0}, 10);
  const auto bf = ref::dynamickv_schedule(scores, config(8, 2, 2, 2, DynamicKVMode::kBitFaithful));
  ASSERT_EQ(bf.updates.size(), 2u);
  EXPECT_EQ(bf.updates[0].budgets, (std::vector<std::int64_t>{16, 0, 0, 0}));
  EXPECT_EQ(bf.updates[0].clipped, (std::vector<std::int64_t>{10, 0, 0, 0}));
  EXPECT_EQ(bf.updates[1].counts, (std::vector<std::int64_t>{1, 0, 0, 0, 0, 0, 0, 1}));
  EXPECT_EQ(bf.updates[1].budgets, (std::vector<std::int64_t>{8, 0, 0, 0, 0, 0, 0, 8}));
  EXPECT_EQ(sum(bf.updates[1].budgets), 2 * 8);
  // Layer 0: [r0 r1 r2 r3 W0 W1] -> [r0..r3 W0 W1 W0 W1] -> [r0..r3 W0 W1 W0 W1 W0 W1].
  EXPECT_EQ(bf.layout[0], (std::vector<std::int64_t>{0, 1, 2, 3, -1, -2, -1, -2, -1, -2}));
  EXPECT_EQ(bf.duplicates, (std::vector<std::int64_t>{4, 0, 0, 0, 0, 0, 0, 2}));
  EXPECT_EQ(bf.prefix, (std::vector<std::int64_t>{4, 0, 0, 0, 0, 0, 0, 4}));

  const auto in = ref::dynamickv_schedule(scores, config(8, 2, 2, 2, DynamicKVMode::kIntended));
  EXPECT_EQ(in.updates[0].budgets, bf.updates[0].budgets);  // the same allocation, clipped to what is held
  EXPECT_EQ(in.updates[0].clipped, (std::vector<std::int64_t>{4, 0, 0, 0}));
  EXPECT_EQ(in.duplicates, std::vector<std::int64_t>(8, 0));
  EXPECT_EQ(in.prefix, (std::vector<std::int64_t>{4, 0, 0, 0, 0, 0, 0, 4}));
  EXPECT_EQ(in.layout[0], (std::vector<std::int64_t>{0, 1, 2, 3, -1, -2}));
}

TEST(DynamicKV, TrailingLayersKeepBmaxWhenLayersAreNotAMultipleOfFour) {
  // L = 6: one update (after layer 3); layers 4 and 5 keep Bmax = 10 and the total exceeds b L = 12.
  const auto s = ref::dynamickv_schedule(one_head({1, 2, 3, 4, 5, 6}, 10),
                                         config(6, 2, 2, 10, DynamicKVMode::kBitFaithful));
  ASSERT_EQ(s.updates.size(), 1u);
  EXPECT_EQ(s.updates[0].layer, 3);
  EXPECT_EQ(sum(s.updates[0].budgets), 2 * 6);  // the update spreads b L over 4 layers
  EXPECT_EQ(s.prefix[4], 10);
  EXPECT_EQ(s.prefix[5], 10);
  EXPECT_GT(sum(s.prefix), 2 * 6);
  // One layer: no update at all, Bmax kept.
  const auto one = ref::dynamickv_schedule(one_head({1}, 30), config(1, 2, 2, 10, DynamicKVMode::kBitFaithful));
  EXPECT_TRUE(one.updates.empty());
  EXPECT_EQ(one.prefix, (std::vector<std::int64_t>{20}));
}

TEST(DynamicKV, ZeroBaseFallsBackToUniform) {
  // b = 0: tau = 0, every count 0, the code would divide 0 / 0; the guard gives every layer b = 0.
  const auto s = ref::dynamickv_schedule(one_head({1, 2, 3, 4}, 6), config(4, 2, 0, 10, DynamicKVMode::kBitFaithful));
  ASSERT_EQ(s.updates.size(), 1u);
  EXPECT_TRUE(s.updates[0].fallback);
  EXPECT_EQ(s.prefix, std::vector<std::int64_t>(4, 0));
}

RC_GTEST_PROP(DynamicKV, ScheduleSumsOnRandomIntegerScores, ()) {
  const int L = *rc::gen::inRange(1, 11);
  const int H = *rc::gen::inRange(1, 4);
  const std::int64_t Lp = *rc::gen::inRange<std::int64_t>(0, 13);
  const std::int64_t w = *rc::gen::inRange<std::int64_t>(1, 5);
  const std::int64_t b = *rc::gen::inRange<std::int64_t>(0, 21);
  const double r_max = *rc::gen::element(0.5, 1.0, 2.0, 5.0, 10.0);
  const auto mode = *rc::gen::element(DynamicKVMode::kBitFaithful, DynamicKVMode::kIntended);
  std::vector<std::vector<VecX>> s(static_cast<std::size_t>(L));
  for (auto& layer : s)
    for (int h = 0; h < H; ++h) {
      VecX v(Lp);
      for (std::int64_t j = 0; j < Lp; ++j) v[j] = *rc::gen::inRange(0, 4);  // coarse: many exact ties
      layer.push_back(v);
    }
  const auto sc = ref::dynamickv_schedule(s, config(L, w, b, r_max, mode));
  RC_ASSERT(sc.bmax == std::min(static_cast<std::int64_t>(r_max * static_cast<double>(b)), Lp));
  RC_ASSERT(static_cast<int>(sc.updates.size()) == L / 4);
  for (const auto& u : sc.updates) {
    if (!u.fallback) RC_ASSERT(sum(u.budgets) == b * L);  // before clipping: exactly b L
    for (std::size_t j = 0; j < u.budgets.size(); ++j) RC_ASSERT(u.clipped[j] <= u.budgets[j]);
  }
  for (int l = 0; l < L; ++l) {
    const auto lu = static_cast<std::size_t>(l);
    RC_ASSERT(sc.prefix[lu] >= 0);  // r_min is not enforced: 0 is allowed
    RC_ASSERT(sc.prefix[lu] <= sc.bmax);
    RC_ASSERT(sc.duplicates[lu] >= 0);
    if (mode == DynamicKVMode::kIntended) RC_ASSERT(sc.duplicates[lu] == 0);
    if (l >= (L / 4) * 4) RC_ASSERT(sc.prefix[lu] == sc.bmax);  // never re-budgeted
    // Layout: ranks 0..k-1, then window entries only, the last w being the window in order.
    const auto& lay = sc.layout[lu];
    for (std::int64_t i = 0; i < sc.prefix[lu]; ++i) RC_ASSERT(lay[static_cast<std::size_t>(i)] == i);
    for (std::size_t i = static_cast<std::size_t>(sc.prefix[lu]); i < lay.size(); ++i) RC_ASSERT(lay[i] < 0);
    for (std::int64_t u = 0; u < w; ++u) RC_ASSERT(lay[lay.size() - static_cast<std::size_t>(w - u)] == -(u + 1));
  }
  // With L a multiple of 4 the last update covers every layer: the kept past tokens are <= b L.
  if (L % 4 == 0 && !sc.updates.back().fallback) RC_ASSERT(sum(sc.prefix) <= b * L);
  // Pure: the same scores give the same schedule.
  const auto again = ref::dynamickv_schedule(s, config(L, w, b, r_max, mode));
  RC_ASSERT(again.layout == sc.layout);
}

TEST(DynamicKV, ParametersAndPresets) {
  EXPECT_NO_THROW(make("dynamickv"));
  EXPECT_NE(make("dynamickv@pred")->name().find("window=16"), std::string::npos);
  EXPECT_NE(make("dynamickv@pred")->name().find("r_max=5"), std::string::npos);
  EXPECT_NE(make("dynamickv@paper")->name().find("window=8"), std::string::npos);
  for (const char* bad : {"dynamickv:kernel=4", "dynamickv:window=0", "dynamickv:mode=fixed", "dynamickv:r_max=-1",
                          "dynamickv:interval=0", "dynamickv:pooling=none", "dynamickv:gqa=sum"}) {
    try {
      make(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kUsage) << bad;
    }
  }
  const auto m = make("dynamickv");
  EXPECT_EQ(m->laws().allocation, ref::AllocationLaw::kPerLayer);
  EXPECT_EQ(m->laws().conservation, ref::ConservationLaw::kEviction);
  EXPECT_EQ(m->decoder(tests::random_layer(1, 1, 4, 2, 1).input, {4}), nullptr);
}

TEST(DynamicKV, ImpossibleBudgetAndMissingCoupling) {
  const auto m = make("dynamickv");  // window 8
  TraceMeta meta;
  meta.layers = 4;
  meta.prompt_len = 40;
  try {
    m->coupling(meta, 7);
    ADD_FAILURE() << "budget 7 < window 8 accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kImpossibleBudget);
    EXPECT_NE(std::string(e.what()).find("dynamickv"), std::string::npos);
  }
  EXPECT_NO_THROW(m->coupling(meta, 8));
  auto f = tests::random_layer(2, 2, 40, 4, 3);
  f.meta->layers = 4;
  try {
    m->prefill(f.input, 20);
    ADD_FAILURE() << "a 4-layer prefill without the coupling was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kUsage);
  }
  // A prompt shorter than the window is all window (the code would crash): kept whole.
  auto tiny = tests::random_layer(1, 1, 5, 4, 4);
  const auto p = m->prefill(tiny.input, 5);
  EXPECT_EQ(p.plans[0].slots(), 5);
  EXPECT_EQ(p.head_budgets[0], 5);
}

TEST(DynamicKV, PassChecksLayerOrderPromptLengthAndBudget) {
  using Pass = ref::DynamicKVPass<std::vector<VecX>>;
  const ref::DynamicKVConfig c;  // window 8
  const auto expect_error = [](const auto& f, ErrorKind kind, const std::string& text) {
    try {
      f();
      ADD_FAILURE() << "accepted: " << text;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), kind) << e.what();
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  const std::vector<VecX> layer{constant(12, 1.0)};  // one head, T = 20, Lp = 12
  Pass pass(c, 2, 16, "dynamickv (x)");
  expect_error([&] { pass.add_layer(1, 20, layer); }, ErrorKind::kInternal,
               "dynamickv (x): layers must be observed in order (got layer 1, expected 0)");
  pass.add_layer(0, 20, layer);
  const auto score = [&] { return layer; };
  expect_error([&] { Pass::resolve(&pass, c, "dynamickv (x)", 0, 2, 20, 16, score); }, ErrorKind::kUsage,
               "has not observed every layer");
  expect_error([&] { pass.add_layer(1, 21, layer); }, ErrorKind::kInternal,
               "dynamickv (x): layers disagree on the prompt length");
  pass.add_layer(1, 20, layer);
  ASSERT_TRUE(pass.done());
  EXPECT_EQ(Pass::resolve(&pass, c, "dynamickv (x)", 1, 2, 20, 16, score).prefix, pass.schedule().prefix[1]);
  expect_error([&] { Pass::resolve(&pass, c, "dynamickv (x)", 1, 2, 20, 17, score); }, ErrorKind::kInternal,
               "built for budget 16, prefill got 17");
  expect_error([&] { Pass::resolve(&pass, c, "dynamickv (x)", 1, 2, 20, 7, score); }, ErrorKind::kImpossibleBudget,
               "budget 7 is smaller than the observation window 8");
  expect_error([&] { Pass::resolve(nullptr, c, "dynamickv (x)", 1, 2, 20, 16, score); }, ErrorKind::kUsage,
               "prefill of a 2-layer model needs the layer coupling");
  // One layer, no update: Bmax = min(int(r_max b), Lp) = min(80, 12).
  const Pass::Layer one = Pass::resolve(nullptr, c, "dynamickv (x)", 0, 1, 20, 16, score);
  EXPECT_EQ(one.prefix, 12);
  EXPECT_EQ(one.scores->size(), 1u);
}

TEST(DynamicKV, Fp32ScheduleEqualsTheWidenedOne) {
  // The backend's fp32 scores, flat, give the schedule of their exact double widening (ties included).
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> level(0, 6);  // few levels: many ties across layers and heads
  const int L = 8, H = 3;
  const std::int64_t Lp = 17;
  std::vector<ref::DynamicKVFlatScores> flat;
  std::vector<std::vector<VecX>> wide;
  for (int l = 0; l < L; ++l) {
    flat.push_back({H, {}});
    wide.emplace_back();
    for (int h = 0; h < H; ++h) {
      VecX v(Lp);
      for (std::int64_t j = 0; j < Lp; ++j) {
        flat.back().values.push_back(static_cast<float>(level(rng)) * 0.1f);
        v[j] = flat.back().values.back();
      }
      wide.back().push_back(v);
    }
  }
  for (DynamicKVMode mode : {DynamicKVMode::kBitFaithful, DynamicKVMode::kIntended}) {
    const auto a = ref::dynamickv_schedule(flat, config(L, 4, 5, 2.5, mode));
    const auto b = ref::dynamickv_schedule(wide, config(L, 4, 5, 2.5, mode));
    EXPECT_EQ(a.layout, b.layout);
    EXPECT_EQ(a.prefix, b.prefix);
    ASSERT_EQ(a.updates.size(), b.updates.size());
    for (std::size_t u = 0; u < a.updates.size(); ++u) EXPECT_EQ(a.updates[u].counts, b.updates[u].counts);
  }
}

TEST(DynamicKV, OneLayerKeepsWindowPlusTopPooledScores) {
  // One layer: no update, Bmax = min(int(r_max b), Lp) past tokens per head, top by the group's
  // mean pooled score; the same count in every head.
  for (int g : {1, 3}) {
    auto f = tests::random_layer(2 * g, 2, 60, 4, 11 + static_cast<std::uint64_t>(g));
    const auto m = make("dynamickv:r_max=1");  // Bmax = b = budget - 8
    const std::int64_t budget = 20, w = 8, Lp = 52, k = budget - w;
    const auto out = m->prefill(f.input, budget);
    const auto q_scores = ref::dynamickv_layer_scores(f.input, w, 7, ref::Pool::kAvg);
    for (int h = 0; h < 2; ++h) {
      const Plan& p = out.plans[static_cast<std::size_t>(h)];
      EXPECT_EQ(out.head_budgets[static_cast<std::size_t>(h)], k + w);
      EXPECT_TRUE(ref::check_plan(p, {ref::BudgetLaw::kExact, k + w, ref::ConservationLaw::kEviction,
                                      m->protected_tokens(60, k + w)})
                      .ok());
      VecX mean = VecX::Zero(Lp);
      for (int q = h * g; q < (h + 1) * g; ++q) mean += q_scores[static_cast<std::size_t>(q)];
      mean /= g;
      std::vector<char> kept(60, 0);
      for (std::int64_t t : p.token) kept[static_cast<std::size_t>(t)] = 1;
      for (std::int64_t j = Lp; j < 60; ++j) EXPECT_TRUE(kept[static_cast<std::size_t>(j)]) << "window token " << j;
      double min_kept = 1e300, max_evicted = -1e300;
      std::int64_t kept_past = 0;
      for (std::int64_t j = 0; j < Lp; ++j) {
        if (kept[static_cast<std::size_t>(j)]) {
          min_kept = std::min(min_kept, mean[j]);
          ++kept_past;
        } else {
          max_evicted = std::max(max_evicted, mean[j]);
        }
      }
      EXPECT_EQ(kept_past, k);
      EXPECT_GE(min_kept, max_evicted);
    }
  }
}

TEST(DynamicKV, PooledScoresMatchAnIndependentComputation) {
  auto f = tests::random_layer(1, 1, 20, 4, 5);
  const auto s = ref::dynamickv_layer_scores(f.input, 4, 3, ref::Pool::kMax);
  ASSERT_EQ(s.size(), 1u);
  ASSERT_EQ(s[0].size(), 16);
  const ref::MatX& Q = f.input.q[0];
  const ref::MatX& K = f.input.k[0];
  VecX a = VecX::Zero(16);
  for (int i = 16; i < 20; ++i) {
    VecX logits = K.topRows(i + 1) * Q.row(i).transpose() / 2.0;
    const VecX p = ref::softmax(logits);
    a += p.head(16);
  }
  for (int j = 0; j < 16; ++j) {
    double mx = a[j];
    if (j > 0) mx = std::max(mx, a[j - 1]);
    if (j < 15) mx = std::max(mx, a[j + 1]);
    EXPECT_NEAR(s[0][j], mx, 1e-12);
  }
}

namespace {

Tensor random_tensor(std::vector<std::int64_t> shape, std::mt19937_64& rng) {
  Tensor t(std::move(shape));
  std::normal_distribution<float> g;
  for (float& x : t.data) x = g(rng);
  return t;
}

ref::LayerInput to_input(const TraceMeta& meta, int layer, const LayerData& d) {
  ref::LayerInput in;
  in.meta = &meta;
  in.layer = layer;
  auto head = [](const Tensor& t, std::int64_t h) {
    ref::MatX m(t.dim(1), t.dim(2));
    for (std::int64_t i = 0; i < t.dim(1); ++i)
      for (std::int64_t j = 0; j < t.dim(2); ++j) m(i, j) = t.row(h, i)[static_cast<std::size_t>(j)];
    return m;
  };
  for (int h = 0; h < meta.q_heads; ++h) in.q.push_back(head(d.prefill_q, h));
  for (int h = 0; h < meta.kv_heads; ++h) {
    in.k.push_back(head(d.prefill_k, h));
    in.v.push_back(head(d.prefill_v, h));
  }
  return in;
}

class Slots final : public replay::RecordSink {
 public:
  void on_record(const replay::StepRecord& r) override {
    if (r.step == 0 && r.q_head == 0) first_step[r.layer] = r.slots;
  }
  std::map<int, std::int64_t> first_step;
};

}  // namespace

TEST(DynamicKV, MultiLayerReplayUsesTheCouplingSchedule) {
  for (int layers : {8, 6}) {
    for (const char* mode : {"bit-faithful", "intended"}) {
      TraceMeta meta;
      meta.layers = layers;
      meta.q_heads = 4;
      meta.kv_heads = 2;
      meta.head_dim = 8;
      meta.prompt_len = 48;
      meta.decode_steps = 2;
      std::mt19937_64 rng(static_cast<std::uint64_t>(layers));
      std::vector<LayerData> data;
      for (int l = 0; l < layers; ++l) {
        LayerData d;
        // Layer-dependent sharpness so the allocation is uneven.
        d.prefill_q = random_tensor({4, 48, 8}, rng);
        for (float& x : d.prefill_q.data) x *= 0.5f + static_cast<float>(l);
        d.prefill_k = random_tensor({2, 48, 8}, rng);
        d.prefill_v = random_tensor({2, 48, 8}, rng);
        d.decode_q = random_tensor({4, 2, 8}, rng);
        d.decode_k = random_tensor({2, 2, 8}, rng);
        d.decode_v = random_tensor({2, 2, 8}, rng);
        data.push_back(std::move(d));
      }
      const std::string spec = std::string("dynamickv:mode=") + mode + ":r_max=2";
      const std::int64_t budget = 16, w = 8, b = budget - w;
      replay::ReplayOptions o;
      o.methods = {MethodSpec::parse(spec)};
      o.budgets = {Budget::tokens(budget)};
      Slots sink;
      const auto result = replay::run_replay(meta, [&](int l) { return data[static_cast<std::size_t>(l)]; }, o, &sink);
      ASSERT_EQ(result.runs.size(), 1u);
      // The same schedule from the scores directly.
      std::vector<std::vector<VecX>> scores;
      for (int l = 0; l < layers; ++l)
        scores.push_back(ref::dynamickv_layer_scores(to_input(meta, l, data[static_cast<std::size_t>(l)]), w, 7,
                                                     ref::Pool::kAvg));
      DynamicKVScheduleConfig c = config(layers, w, b, 2, std::string(mode) == "intended" ? DynamicKVMode::kIntended
                                                                                          : DynamicKVMode::kBitFaithful);
      const auto sc = ref::dynamickv_schedule(scores, c);
      std::int64_t total = 0;
      bool uneven = false;
      for (int l = 0; l < layers; ++l) {
        EXPECT_EQ(sink.first_step[l], sc.kept(l, w) + 1) << spec << " layer " << l;  // + the decoded token
        total += sc.prefix[static_cast<std::size_t>(l)];
        uneven |= sc.prefix[static_cast<std::size_t>(l)] != sc.prefix[0];
      }
      EXPECT_TRUE(uneven) << spec << ": the test needs an uneven allocation";
      if (layers % 4 == 0) {
        EXPECT_LE(total, b * layers) << spec;
      }
      if (layers == 6) {  // layers 4 and 5 are never re-budgeted: Bmax = min(2 b, 40) = 16
        EXPECT_EQ(sc.prefix[4], 16);
        EXPECT_EQ(sc.prefix[5], 16);
      }
      EXPECT_GT(result.runs[0].plans_checked, 0);
    }
  }
}

// The bucketed prefix top-k against the definition: sort layers 0..n-1 by
// (value descending, flat index ascending), count the first k per layer. In
// double (the reference's scores) and in float (a backend's, read in place),
// its passes over the layers run by `each` (empty: in turn).
template <class V>
void expect_prefix_counts_equal_a_stable_sort(const std::vector<V>& flat, int L, std::int64_t P, int trial,
                                              const ForEachIndex& each, const char* how) {
  std::vector<std::span<const V>> layers;
  for (int l = 0; l < L; ++l) layers.emplace_back(flat.data() + l * P, static_cast<std::size_t>(P));
  // Every prefix and several k, asked at once (queries share buckets), plus
  // n beyond the layers (clamped).
  std::vector<ref::PrefixTopKQuery> queries;
  for (int n = 0; n <= L + 1; ++n)
    for (std::int64_t k : {std::int64_t{0}, std::int64_t{1}, n * P / 3, n * P - 1, n * P, n * P + 5})
      queries.push_back({n, k});
  const std::vector<std::vector<std::int64_t>> got = ref::prefix_topk_counts<V>(layers, queries, each);
  ASSERT_EQ(got.size(), queries.size());
  for (std::size_t q = 0; q < queries.size(); ++q) {
    const int n = std::min(queries[q].n, L);
    const std::int64_t k = queries[q].k;
    std::vector<std::int64_t> order(static_cast<std::size_t>(n * P));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
      return flat[static_cast<std::size_t>(a)] > flat[static_cast<std::size_t>(b)];
    });
    std::vector<std::int64_t> want(static_cast<std::size_t>(n), 0);
    for (std::int64_t i = 0; i < std::clamp<std::int64_t>(k, 0, n * P); ++i)
      ++want[static_cast<std::size_t>(order[static_cast<std::size_t>(i)] / P)];
    EXPECT_EQ(got[q], want) << (sizeof(V) == 4 ? "float" : "double") << ", layers " << how << ", trial " << trial
                            << ", L " << L << ", P "
                            << P << ", n " << queries[q].n << ", k " << k;
  }
}

TEST(DynamicKV, PrefixTopKCountsEqualAStableSortOfEveryPrefix) {
  std::mt19937_64 rng(20261201);
  std::printf("seed 20261201\n");
  for (int trial = 0; trial < 60; ++trial) {
    const int L = 1 + static_cast<int>(rng() % 6);
    const std::int64_t P = static_cast<std::int64_t>(rng() % 300);
    std::vector<double> flat(static_cast<std::size_t>(L * P));
    for (double& x : flat) {
      switch (trial % 6) {
        case 0: x = static_cast<double>(rng() % 5); break;                       // heavy ties
        case 1: x = std::ldexp(static_cast<double>(rng() % 1000), -static_cast<int>(rng() % 60)); break;
        case 2: x = (rng() % 2 ? -1.0 : 1.0) * static_cast<double>(rng() % 3) * 0.5; break;  // signed zeros
        case 3: x = 1.0 + 1e-12 * static_cast<double>(rng() % 7); break;         // one narrow range
        case 4:  // both signs over many binades: the bucket range spans the whole key space
          x = (rng() % 2 ? -1.0 : 1.0) * std::ldexp(1.0 + static_cast<double>(rng() % 8), static_cast<int>(rng() % 200) - 100);
          break;
        default: x = rng() % 50 == 0 ? 1e30 : 1e-3 * static_cast<double>(rng() % 9); break;  // one far outlier
      }
    }
    // The layers in turn, last to first, and all at once on their own threads (a backend's loop).
    const ForEachIndex reversed = [](int n, const std::function<void(int)>& body) {
      for (int l = n - 1; l >= 0; --l) body(l);
    };
    const ForEachIndex threads = [](int n, const std::function<void(int)>& body) {
      std::vector<std::thread> t;
      for (int l = 0; l < n; ++l) t.emplace_back(body, l);
      for (std::thread& x : t) x.join();
    };
    const std::vector<float> narrow(flat.begin(), flat.end());
    expect_prefix_counts_equal_a_stable_sort(flat, L, P, trial, {}, "in turn");
    expect_prefix_counts_equal_a_stable_sort(flat, L, P, trial, reversed, "last to first");
    expect_prefix_counts_equal_a_stable_sort(narrow, L, P, trial, {}, "in turn");
    expect_prefix_counts_equal_a_stable_sort(narrow, L, P, trial, threads, "on threads");
  }
}
