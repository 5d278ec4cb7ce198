// EMS (reconstructed): the Global-Local score is scale invariant; every token
// is window, centre, merged into exactly one centre, or zero class; exactly B
// slots per head; keys keep their centre's norm (also after decode-time
// re-compression); values are convex; merge share 0 is plain top-score
// eviction bit for bit; budget >= n is the identity; heads are independent;
// the new conservation law catches broken plans.
#include <gtest/gtest.h>
#include <rapidcheck/gtest.h>

#include <cmath>

#include "decode_driver.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/ems.hpp"
#include "kvscope/reference/plan_apply.hpp"
#include "kvscope/reference/plan_checker.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope_test_gen.hpp"
#include "kvscope_method_test.hpp"

using namespace kvscope;
using ref::EmsClass;
using ref::EmsConfig;
using ref::MatX;
using ref::VecX;

namespace {

using tests::make;

bool same_plan(const Plan& a, const Plan& b) {
  return a.n == b.n && a.row_ptr == b.row_ptr && a.token == b.token && a.coef_k == b.coef_k && a.coef_v == b.coef_v &&
         a.position == b.position && a.count == b.count && a.positions == b.positions;
}

ref::CheckRequest law(std::int64_t budget, std::int64_t n, std::int64_t window) {
  return {ref::BudgetLaw::kExact, budget, ref::ConservationLaw::kNormPreservingKeys,
          ref::index_range(n - std::min({window, budget, n}), n)};
}

// Items of one head of a fixture: prefill scores, positions 0..T-1.
ref::EmsItems items_of(const ref::LayerInput& in, int kv, const EmsConfig& c) {
  ref::EmsItems it;
  it.K = &in.k[static_cast<std::size_t>(kv)];
  it.V = &in.v[static_cast<std::size_t>(kv)];
  ref::ems_prefill_scores(in, kv, c, it.glo, it.loc);
  it.position = ref::index_range(0, in.tokens());
  return it;
}

// Every class matches the plan: window/centre tokens head their own slot,
// merged tokens sit in their centre's slot, zero-class tokens in none.
void expect_accounting(const ref::EmsResult& r, std::int64_t n, std::int64_t budget) {
  std::vector<std::int64_t> slot_of(static_cast<std::size_t>(n), -1), head_of_slot;
  for (std::int64_t i = 0; i < r.plan.slots(); ++i) {
    head_of_slot.push_back(r.plan.position[static_cast<std::size_t>(i)]);
    for (std::int64_t e = r.plan.row_begin(i); e < r.plan.row_end(i); ++e) {
      auto& s = slot_of[static_cast<std::size_t>(r.plan.token[static_cast<std::size_t>(e)])];
      EXPECT_EQ(s, -1) << "token in two slots";
      s = i;
    }
  }
  std::int64_t counts[4] = {0, 0, 0, 0};
  for (std::int64_t j = 0; j < n; ++j) {
    const auto ju = static_cast<std::size_t>(j);
    ++counts[static_cast<int>(r.cls[ju])];
    switch (r.cls[ju]) {
      case EmsClass::kWindow:
      case EmsClass::kCentre:
        ASSERT_GE(slot_of[ju], 0);
        EXPECT_EQ(head_of_slot[static_cast<std::size_t>(slot_of[ju])], j);
        break;
      case EmsClass::kMerged:
        ASSERT_GE(slot_of[ju], 0);
        EXPECT_EQ(head_of_slot[static_cast<std::size_t>(slot_of[ju])], r.centre[ju]);
        EXPECT_EQ(r.cls[static_cast<std::size_t>(r.centre[ju])], EmsClass::kCentre);
        break;
      case EmsClass::kZero: EXPECT_EQ(slot_of[ju], -1); break;
    }
  }
  if (n > budget) {
    EXPECT_EQ(r.plan.slots(), budget);
    EXPECT_EQ(counts[static_cast<int>(EmsClass::kWindow)], r.window);
    EXPECT_EQ(counts[static_cast<int>(EmsClass::kCentre)], r.n_imp);
    EXPECT_EQ(r.window + r.n_imp + r.n_tbm + r.n_irr, n);
    EXPECT_LE(counts[static_cast<int>(EmsClass::kMerged)], r.n_tbm);
  } else {
    EXPECT_EQ(r.plan.slots(), n);
  }
}

}  // namespace

TEST(EMS, GlobalLocalScoreIsInvariantToRescalingEitherComponent) {
  auto f = tests::random_layer(2, 1, 30, 4, 21);
  EmsConfig c;
  VecX glo, loc;
  ref::ems_prefill_scores(f.input, 0, c, glo, loc);
  for (auto comb : {ref::EmsCombiner::kSum, ref::EmsCombiner::kMax, ref::EmsCombiner::kWeighted}) {
    c.combiner = comb;
    c.lambda = 0.3;
    const VecX s = ref::ems_global_local(glo, loc, c);
    EXPECT_EQ(ref::ems_global_local(glo * 8.0, loc, c), s);          // powers of two: bit for bit
    EXPECT_EQ(ref::ems_global_local(glo, loc * 0.0625, c), s);
    EXPECT_LT((ref::ems_global_local(glo * 3.7, loc * 1e-3, c) - s).norm(), 1e-12 * s.norm());
  }
  // Mean alignment: each component has mean 1, so the sum has mean 2.
  c.combiner = ref::EmsCombiner::kSum;
  EXPECT_NEAR(ref::ems_global_local(glo, loc, c).mean(), 2.0, 1e-12);
  // A component that is all zero contributes nothing.
  EXPECT_EQ(ref::ems_global_local(glo, VecX::Zero(30), c), VecX(glo / glo.mean()));
}

TEST(EMS, ShareZeroIsTopScoreEvictionBitForBit) {
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    auto f = tests::random_layer(4, 2, 40, 6, seed);
    const auto m = make("ems@evict-only");
    const std::int64_t B = 17, w = 8;
    const auto out = m->prefill(f.input, B);
    EmsConfig c;
    for (int kv = 0; kv < 2; ++kv) {
      const auto it = items_of(f.input, kv, c);
      const VecX s = ref::ems_global_local(it.glo, it.loc, c);
      const auto sel = ref::top_k(s, ref::index_range(0, 40 - w), B - w);
      const Plan evict = Plan::keep(40, ref::merge_sorted(sel.kept, ref::index_range(40 - w, 40)));
      EXPECT_TRUE(same_plan(out.plans[static_cast<std::size_t>(kv)], evict)) << "seed " << seed << " head " << kv;
      // tau above every similarity: the to-be-merged all fall to the zero class -> the same eviction.
      EmsConfig high = c;
      high.share_fixed = true;
      high.share_value = 1;
      high.tau = 2;
      EXPECT_TRUE(same_plan(ref::ems_compress(it, B, high).plan, evict));
    }
  }
}

TEST(EMS, BudgetCoveringThePromptIsTheIdentity) {
  auto f = tests::random_layer(2, 2, 12, 4, 5);
  const auto m = make("ems");
  for (std::int64_t B : {12, 13, 100}) {
    const auto out = m->prefill(f.input, B);
    for (const Plan& p : out.plans) EXPECT_TRUE(same_plan(p, Plan::identity(12)));
  }
}

TEST(EMS, MergedKeysKeepTheirCentresNorm) {
  auto f = tests::random_layer(2, 1, 60, 8, 9);
  EmsConfig c;
  c.share_fixed = true;
  c.share_value = 1;  // merge every non-kept token
  c.tau = -2;         // into its best centre, however dissimilar
  c.similarity = ref::EmsSimilarity::kKeys;
  const auto it = items_of(f.input, 0, c);
  const auto r = ref::ems_compress(it, 20, c);
  expect_accounting(r, 60, 20);
  EXPECT_EQ(r.n_irr, 0);
  const auto cache = ref::apply_plan(r.plan, f.input.k[0], f.input.v[0], 10000.0);
  int merged = 0;
  for (std::int64_t i = 0; i < r.plan.slots(); ++i) {
    const std::int64_t ctr = r.plan.position[static_cast<std::size_t>(i)];
    const double nc = f.input.k[0].row(ctr).norm();
    EXPECT_NEAR(cache.K.row(i).norm(), nc, 1e-12 * nc) << "slot " << i;
    if (r.plan.row_end(i) - r.plan.row_begin(i) > 1) {
      ++merged;
      // Values: a convex combination; keys: the same direction, rescaled.
      double sv = 0, min_cos = 1;
      Eigen::RowVectorXd mix = Eigen::RowVectorXd::Zero(8);
      for (std::int64_t e = r.plan.row_begin(i); e < r.plan.row_end(i); ++e) {
        const auto eu = static_cast<std::size_t>(e);
        EXPECT_GT(r.plan.coef_v[eu], 0.0);
        sv += r.plan.coef_v[eu];
        mix += r.plan.coef_v[eu] * f.input.k[0].row(r.plan.token[eu]);
        const Eigen::RowVectorXd kx = f.input.k[0].row(r.plan.token[eu]);
        min_cos = std::min(min_cos, kx.dot(f.input.k[0].row(ctr)) / (kx.norm() * nc));
      }
      EXPECT_NEAR(sv, 1.0, 1e-12);
      EXPECT_NEAR(cache.K.row(i).dot(mix) / (cache.K.row(i).norm() * mix.norm()), 1.0, 1e-12);
      const double cos_c = cache.K.row(i).dot(f.input.k[0].row(ctr)) / (nc * nc);
      if (min_cos >= 0) {
        EXPECT_GE(cos_c, min_cos - 1e-12);
      }
    }
  }
  EXPECT_GT(merged, 0);
  EXPECT_TRUE(ref::check_plan(r.plan, law(20, 60, 8)).ok()) << ref::check_plan(r.plan, law(20, 60, 8)).summary();
}

TEST(EMS, HeadsAreIndependent) {
  auto f = tests::random_layer(4, 2, 36, 4, 13);
  const auto m = make("ems");
  const auto out = m->prefill(f.input, 14);
  auto swapped = f;
  std::swap(swapped.input.k[0], swapped.input.k[1]);
  std::swap(swapped.input.v[0], swapped.input.v[1]);
  std::swap(swapped.input.q[0], swapped.input.q[2]);
  std::swap(swapped.input.q[1], swapped.input.q[3]);
  const auto out2 = m->prefill(swapped.input, 14);
  EXPECT_TRUE(same_plan(out.plans[0], out2.plans[1]));
  EXPECT_TRUE(same_plan(out.plans[1], out2.plans[0]));
  // Changing head 1's data leaves head 0's plan alone.
  auto changed = f;
  changed.input.v[1] *= -3.0;
  EXPECT_TRUE(same_plan(m->prefill(changed.input, 14).plans[0], out.plans[0]));
}

RC_GTEST_PROP(EMS, EveryTokenHasOneClassAndPlansObeyTheLaw, ()) {
  const std::int64_t n = *rc::gen::inRange<std::int64_t>(1, 30);
  const int d = *rc::gen::inRange(1, 5);
  const MatX K = *tests::grid_matrix(n, d, 2);
  const MatX V = *tests::grid_matrix(n, d, 2);
  ref::EmsItems it;
  it.K = &K;
  it.V = &V;
  it.glo = VecX(n);
  it.loc = VecX(n);
  for (std::int64_t j = 0; j < n; ++j) {
    it.glo[j] = *rc::gen::inRange(0, 4);  // integer scores: exact ties
    it.loc[j] = *rc::gen::inRange(0, 4);
  }
  it.position = ref::index_range(0, n);
  EmsConfig c;
  c.window = *rc::gen::inRange<std::int64_t>(0, 6);
  c.combiner = *rc::gen::element(ref::EmsCombiner::kSum, ref::EmsCombiner::kMax, ref::EmsCombiner::kWeighted);
  c.share_fixed = *rc::gen::arbitrary<bool>();
  c.share_value = *rc::gen::inRange(0, 5) / 4.0;
  c.similarity = *rc::gen::element(ref::EmsSimilarity::kKeyValue, ref::EmsSimilarity::kKeys);
  c.tau = *rc::gen::inRange(-4, 5) / 4.0;
  c.weights = *rc::gen::element(ref::EmsMergeWeights::kScore, ref::EmsMergeWeights::kAttention);
  const std::int64_t B = *rc::gen::inRange<std::int64_t>(0, n + 3);
  const auto r = ref::ems_compress(it, B, c);
  expect_accounting(r, n, B);
  const auto check = ref::check_plan(r.plan, law(B, n, c.window));
  RC_ASSERT(check.ok());
  if (n > B) {
    // Centres beat every other candidate; the to-be-merged beat the irrelevant (ties: either side).
    double min_centre = 1e300, max_other = -1e300;
    for (std::int64_t j = 0; j < n; ++j) {
      const auto cl = r.cls[static_cast<std::size_t>(j)];
      if (cl == EmsClass::kCentre) min_centre = std::min(min_centre, r.score[j]);
      if (cl == EmsClass::kMerged || cl == EmsClass::kZero) max_other = std::max(max_other, r.score[j]);
    }
    if (r.n_imp > 0 && n - B > 0) RC_ASSERT(min_centre >= max_other);
    RC_ASSERT(r.share >= 0.0 && r.share <= 1.0);
    if (c.share_fixed && c.share_value == 0) RC_ASSERT(r.n_tbm == 0);
  }
}

TEST(EMS, AdaptiveShareFollowsSparsityAndRedundancy) {
  // Identical keys and values: redundancy 1; flat scores: the centres hold B-w of n-w of the mass.
  const std::int64_t n = 20;
  MatX K = MatX::Ones(n, 2), V = MatX::Ones(n, 2);
  ref::EmsItems it;
  it.K = &K;
  it.V = &V;
  it.glo = VecX::Ones(n);
  it.loc = VecX::Ones(n);
  it.position = ref::index_range(0, n);
  EmsConfig c;
  c.window = 4;
  const auto r = ref::ems_compress(it, 8, c);  // 4 centres of 16 candidates
  EXPECT_DOUBLE_EQ(r.sparsity, 4.0 / 16.0);
  EXPECT_NEAR(r.redundancy, 1.0, 1e-15);
  EXPECT_DOUBLE_EQ(r.share, 0.75);
  EXPECT_EQ(r.n_tbm, 9);  // round(0.75 * 12)
  EXPECT_EQ(r.n_irr, 3);
  // Orthogonal values: kv similarity 0 -> share 0 (keys alone would still see redundancy 1).
  for (std::int64_t j = 0; j < n; ++j) V.row(j) = (j < 4 ? Eigen::RowVector2d(1, 0) : Eigen::RowVector2d(0, 1));
  EXPECT_EQ(ref::ems_compress(it, 8, c).n_tbm, 0);
  c.similarity = ref::EmsSimilarity::kKeys;
  EXPECT_EQ(ref::ems_compress(it, 8, c).n_tbm, 9);
  // All the mass on the centres: sparsity 1 -> nothing merged.
  c.similarity = ref::EmsSimilarity::kKeyValue;
  for (std::int64_t j = 0; j < n; ++j) V.row(j) = Eigen::RowVector2d(1, 1);
  it.glo = VecX::Zero(n);
  it.glo.head(4).setConstant(5.0);
  EXPECT_EQ(ref::ems_compress(it, 8, c).n_tbm, 0);
}

TEST(EMS, DecodeRecompressesToExactlyTheBudgetAndKeepsNorms) {
  const auto L = tests::random_decode_layer(4, 2, 24, 10, 6, 31, 2.0);
  for (const char* spec : {"ems", "ems:share=1:tau=-2", "ems:decode_every=3"}) {
    const auto m = make(spec);
    const std::int64_t B = 12;
    std::vector<std::int64_t> sizes;
    const auto caches = tests::drive(*m, L, B, [&](const tests::StepView& v) {
      sizes.push_back((*v.caches)[0].plan.slots());
    });
    if (std::string(spec) == "ems:decode_every=3") {
      EXPECT_EQ(m->laws().decode_budget, ref::BudgetLaw::kNone);
      for (std::int64_t s : sizes) EXPECT_LE(s, B + 2);
    } else {
      EXPECT_EQ(m->laws().decode_budget, ref::BudgetLaw::kExact);
      for (std::int64_t s : sizes) EXPECT_EQ(s, B);
    }
    bool merged = false;
    for (std::size_t h = 0; h < caches.size(); ++h) {
      const Plan& p = caches[h].plan;
      EXPECT_TRUE(ref::check_plan(p, {ref::BudgetLaw::kAtMost, B + 2, ref::ConservationLaw::kNormPreservingKeys, {}}).ok());
      for (std::int64_t i = 0; i < p.slots(); ++i) {
        const double nc = L.K[h].row(p.position[static_cast<std::size_t>(i)]).norm();
        EXPECT_NEAR(caches[h].K.row(i).norm(), nc, 1e-10 * nc) << spec << " head " << h << " slot " << i;
        merged |= p.count[static_cast<std::size_t>(i)] > 1;
      }
    }
    if (std::string(spec) != "ems") {
      EXPECT_TRUE(merged) << spec;
    }
  }
}

TEST(EMS, ParametersAndLaws) {
  for (const char* bad : {"ems:share=2", "ems:share=half", "ems:share=-0.5", "ems:lambda=1.5",
                          "ems:combiner=min", "ems:similarity=values", "ems:decode_every=0", "ems:window=-1"}) {
    try {
      make(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kUsage) << bad;
    }
  }
  const auto m = make("ems");
  EXPECT_EQ(m->laws().conservation, ref::ConservationLaw::kNormPreservingKeys);
  EXPECT_EQ(m->laws().prefill_budget, ref::BudgetLaw::kExact);
  EXPECT_EQ(make("ems:decode=grow")->decoder(tests::random_layer(1, 1, 4, 2, 1).input, {2}), nullptr);
  EXPECT_EQ(m->protected_tokens(20, 5), ref::index_range(15, 20));  // window shrinks to the budget
  EXPECT_EQ(m->protected_tokens(20, 12), ref::index_range(12, 20));
  EXPECT_STREQ(ref::conservation_law_name(ref::ConservationLaw::kNormPreservingKeys), "norm-preserving-keys");
}

TEST(EMS, CheckerRejectsBrokenNormPreservingPlans) {
  auto row = [](std::vector<std::int64_t> t, std::vector<double> k, std::vector<double> v, std::int64_t pos,
                std::int64_t cnt) {
    Plan p;
    p.n = 4;
    p.add_row(t, k, v, pos, cnt);
    return p;
  };
  const ref::CheckRequest req{ref::BudgetLaw::kNone, 0, ref::ConservationLaw::kNormPreservingKeys, {}};
  EXPECT_TRUE(ref::check_plan(row({0, 2}, {1.7, 0.4}, {0.8, 0.2}, 0, 2), req).ok());
  EXPECT_FALSE(ref::check_plan(row({0, 2}, {1.7, 0.4}, {0.5, 0.2}, 0, 2), req).ok());  // values not convex
  EXPECT_FALSE(ref::check_plan(row({0, 2}, {1.7, 0.4}, {0.8, 0.2}, 1, 2), req).ok());  // centre not in the row
  EXPECT_FALSE(ref::check_plan(row({0, 2}, {1.7, 0.4}, {0.8, 0.2}, 0, 3), req).ok());  // count != entries
  EXPECT_FALSE(ref::check_plan(row({0}, {2.0}, {1.0}, 0, 1), req).ok());               // a lone token rescaled
  EXPECT_FALSE(ref::check_plan(row({0, 2}, {1.7, 0.4}, {1.0, 0.0}, 2, 2), req).ok());  // centre with weight 0
  Plan two = row({0, 2}, {1.7, 0.4}, {0.8, 0.2}, 0, 2);
  two.add_row(std::vector<std::int64_t>{2}, std::vector<double>{1.0}, std::vector<double>{1.0}, 2, 1);
  EXPECT_FALSE(ref::check_plan(two, req).ok());  // token 2 in two slots
}
