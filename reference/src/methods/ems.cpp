#include "kvscope/reference/methods/ems.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <deque>
#include <limits>
#include <numeric>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/scorer.hpp"

namespace kvscope::ref {

namespace {

double safe_mean(const VecX& x) { return x.size() > 0 ? x.mean() : 0.0; }

double cosine(const Eigen::Ref<const Eigen::RowVectorXd>& a, const Eigen::Ref<const Eigen::RowVectorXd>& b) {
  const double na = a.norm(), nb = b.norm();
  if (na == 0.0 || nb == 0.0) return 0.0;
  return a.dot(b) / (na * nb);
}

// Guard of the norm-preserving key merge: a merged direction this much
// shorter than the weights' norms has cancelled (reconstructed guard).
constexpr double kCancel = 1e-9;
// Weights and score gaps this small may be 0 in fp32 (a backend's compute):
// their decisions are ties (compare_selection's absolute slack).
constexpr double kTinyWeight = 1e-30;
// A merged key direction shorter than this share of the weights' norms
// amplifies a backend's weight rounding into its key coefficients: a tie.
constexpr double kCancelMargin = 0.1;

}  // namespace

VecX ems_global_local(const VecX& glo, const VecX& loc, const EmsConfig& c) {
  const double mg = safe_mean(glo), ml = safe_mean(loc);
  const VecX g = mg > 0 ? VecX(glo / mg) : VecX(VecX::Zero(glo.size()));
  const VecX l = ml > 0 ? VecX(loc / ml) : VecX(VecX::Zero(loc.size()));
  switch (c.combiner) {
    case EmsCombiner::kSum: return g + l;
    case EmsCombiner::kMax: return g.cwiseMax(l);
    case EmsCombiner::kWeighted: return c.lambda * g + (1.0 - c.lambda) * l;
  }
  return g + l;
}

double ems_similarity(const MatX& K, const MatX& V, std::int64_t x, std::int64_t y, EmsSimilarity s) {
  const double ck = cosine(K.row(x), K.row(y));
  return s == EmsSimilarity::kKeys ? ck : ck * cosine(V.row(x), V.row(y));
}

EmsAssignment ems_assign(const MatX& K, const MatX& V, const std::vector<std::int64_t>& rest,
                         const std::vector<std::int64_t>& centres, const std::vector<char>& can_take,
                         const EmsConfig& c) {
  constexpr double kNone = -std::numeric_limits<double>::infinity();
  EmsAssignment a;
  a.best.assign(rest.size(), kNone);
  a.second.assign(rest.size(), kNone);
  a.centre.assign(rest.size(), -1);
  a.any.assign(rest.size(), kNone);
  for (std::size_t i = 0; i < rest.size(); ++i) {
    for (std::size_t e = 0; e < centres.size(); ++e) {
      const double s = ems_similarity(K, V, rest[i], centres[e], c.similarity);
      a.any[i] = std::max(a.any[i], s);
      if (!can_take[e]) continue;
      if (s > a.best[i]) {
        a.second[i] = a.best[i];
        a.best[i] = s;
        a.centre[i] = centres[e];
      } else if (s > a.second[i]) {
        a.second[i] = s;
      }
    }
    if (a.best[i] < c.tau) a.centre[i] = -1;  // the zero class
  }
  return a;
}

EmsResult ems_compress(const EmsItems& items, std::int64_t budget, const EmsConfig& c, const EmsAssignFn* assign) {
  const MatX& K = *items.K;
  const MatX& V = *items.V;
  const std::int64_t n = K.rows();
  if (budget < 0) throw Error(ErrorKind::kImpossibleBudget, "ems: negative budget " + std::to_string(budget));
  if (V.rows() != n || items.glo.size() != n || items.loc.size() != n || static_cast<std::int64_t>(items.position.size()) != n)
    throw Error(ErrorKind::kInternal, "ems: item arrays disagree in length");
  EmsResult r;
  r.margin = std::numeric_limits<double>::infinity();
  r.score = ems_global_local(items.glo, items.loc, c);
  r.cls.assign(static_cast<std::size_t>(n), EmsClass::kWindow);
  r.centre.assign(static_cast<std::size_t>(n), -1);
  // Items in position order: the window is the last w of them.
  std::vector<std::int64_t> by_pos(static_cast<std::size_t>(n));
  std::iota(by_pos.begin(), by_pos.end(), 0);
  std::stable_sort(by_pos.begin(), by_pos.end(), [&](std::int64_t a, std::int64_t b) {
    return items.position[static_cast<std::size_t>(a)] < items.position[static_cast<std::size_t>(b)];
  });
  if (n <= budget) {
    r.window = n;
    r.plan.n = n;
    for (std::int64_t j : by_pos) r.plan.add_kept(j);
    return r;
  }
  const std::int64_t w = std::min({c.window, budget, n});
  r.window = w;
  std::vector<std::int64_t> cand(by_pos.begin(), by_pos.end() - w);
  for (std::int64_t j : cand) r.cls[static_cast<std::size_t>(j)] = EmsClass::kZero;
  // Candidates by s_GL, higher first, lower position (then item) first on ties.
  std::vector<std::int64_t> order = cand;
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
    return r.score[a] != r.score[b] ? r.score[a] > r.score[b] : false;
  });
  r.n_imp = budget - w;
  const std::vector<std::int64_t> centres(order.begin(), order.begin() + r.n_imp);
  const std::vector<std::int64_t> rest(order.begin() + r.n_imp, order.end());
  for (std::int64_t j : centres) r.cls[static_cast<std::size_t>(j)] = EmsClass::kCentre;

  // Head statistics: sparsity = share of the candidates' accumulated attention
  // the centres hold; redundancy = mean over the rest of the best similarity to a centre.
  double mass_all = 0, mass_centres = 0;
  for (std::int64_t j : cand) mass_all += items.glo[j];
  for (std::int64_t j : centres) mass_centres += items.glo[j];
  r.sparsity = mass_all > 0 ? mass_centres / mass_all : 1.0;
  // Centres in position order, so equal similarities go to the earliest centre.
  std::vector<std::int64_t> centres_pos = centres;
  std::stable_sort(centres_pos.begin(), centres_pos.end(), [&](std::int64_t a, std::int64_t b) {
    return items.position[static_cast<std::size_t>(a)] < items.position[static_cast<std::size_t>(b)];
  });
  auto weight = [&](std::int64_t j) { return c.weights == EmsMergeWeights::kScore ? r.score[j] : items.glo[j]; };
  std::vector<char> can_take;  // assignment: centres that can take members
  for (std::int64_t ctr : centres_pos) can_take.push_back(weight(ctr) > 0);
  const EmsAssignment a = assign ? (*assign)(rest, centres_pos, can_take) : ems_assign(K, V, rest, centres_pos, can_take, c);
  double red = 0;
  for (std::size_t i = 0; i < rest.size(); ++i) red += centres_pos.empty() ? 0.0 : a.any[i];  // redundancy counts every centre
  r.redundancy = rest.empty() ? 0.0 : red / static_cast<double>(rest.size());
  r.share = c.share_fixed ? c.share_value
                          : std::clamp(c.share_gain * std::max(0.0, r.redundancy) * (1.0 - r.sparsity), 0.0, 1.0);
  const auto R = static_cast<std::int64_t>(rest.size());
  r.n_tbm = std::min(R, static_cast<std::int64_t>(std::floor(r.share * static_cast<double>(R) + 0.5)));
  r.n_irr = R - r.n_tbm;

  // Assignment: a to-be-merged token joins its most similar centre, or the
  // zero class when that similarity is below tau, no centre can take members
  // (weight 0) or its own weight is 0.
  std::vector<std::vector<std::int64_t>> members(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < r.n_tbm; ++i) {
    const auto iu = static_cast<std::size_t>(i);
    const std::int64_t x = rest[iu];
    if (a.centre[iu] < 0 || !(weight(x) > 0)) continue;
    members[static_cast<std::size_t>(a.centre[iu])].push_back(x);
    r.cls[static_cast<std::size_t>(x)] = EmsClass::kMerged;
    r.centre[static_cast<std::size_t>(x)] = a.centre[iu];
  }

  // Margins of those decisions (relative; 0 = a tie a backend may decide otherwise).
  {
    // s_GL gap at rank k, relative to the scores at the cut: fp32 softmax
    // errors are relative to each probability, so a heavy sink elsewhere does
    // not widen the margin of a cut among light tokens.
    const auto cut = [&](const std::vector<std::int64_t>& ranked, std::int64_t k) {
      if (k <= 0 || k >= static_cast<std::int64_t>(ranked.size())) return std::numeric_limits<double>::infinity();
      const double hi = r.score[ranked[static_cast<std::size_t>(k - 1)]], lo = r.score[ranked[static_cast<std::size_t>(k)]];
      const double gap = hi - lo, scale = std::max(std::abs(hi), std::abs(lo));
      return gap <= kTinyWeight || !(scale > 0) ? 0.0 : gap / scale;
    };
    const auto tiny = [](double x) { return x > 0 && x <= kTinyWeight; };  // fp32 may round it to 0
    double m = std::min(cut(order, r.n_imp), cut(rest, r.n_tbm));
    if (!c.share_fixed && R > 0) {
      const double x = r.share * static_cast<double>(R) + 0.5;
      m = std::min(m, std::abs(x - std::round(x)) / static_cast<double>(R));
    }
    for (std::int64_t ctr : centres_pos)
      if (tiny(weight(ctr))) m = 0;
    for (std::int64_t i = 0; i < r.n_tbm; ++i) {
      const auto iu = static_cast<std::size_t>(i);
      if (tiny(weight(rest[iu]))) m = 0;
      if (!(weight(rest[iu]) > 0) || !std::isfinite(a.best[iu])) continue;
      m = std::min(m, std::abs(a.best[iu] - c.tau));  // similarities: scale 1
      if (std::isfinite(a.second[iu])) m = std::min(m, a.best[iu] - a.second[iu]);
    }
    r.margin = m;
  }

  r.plan.n = n;
  std::vector<std::int64_t> toks;
  std::vector<double> ck, cv;
  for (std::int64_t j : by_pos) {
    const auto ju = static_cast<std::size_t>(j);
    if (r.cls[ju] != EmsClass::kWindow && r.cls[ju] != EmsClass::kCentre) continue;
    if (members[ju].empty()) {
      r.plan.add_kept(j);
      continue;
    }
    toks.assign(1, j);
    toks.insert(toks.end(), members[ju].begin(), members[ju].end());
    std::sort(toks.begin(), toks.end());
    double total = 0;
    for (std::int64_t t : toks) total += weight(t);
    cv.clear();
    for (std::int64_t t : toks) cv.push_back(weight(t) / total);
    // Norm-preserving key merge: k' = ||k_c|| * m / ||m||, m = sum alpha k.
    Eigen::RowVectorXd m = Eigen::RowVectorXd::Zero(K.cols());
    double spread = 0;
    for (std::size_t e = 0; e < toks.size(); ++e) {
      m += cv[e] * K.row(toks[e]);
      spread += cv[e] * K.row(toks[e]).norm();
    }
    const double nc = K.row(j).norm(), nm = m.norm();
    if (nc > 0.0 && !(nm >= kCancelMargin * spread)) r.margin = 0;
    ck.assign(toks.size(), 0.0);
    if (nc == 0.0 || !(nm > kCancel * spread)) {
      for (std::size_t e = 0; e < toks.size(); ++e) ck[e] = toks[e] == j ? 1.0 : 0.0;  // keep the centre's key
    } else {
      const double s = nc / nm;
      for (std::size_t e = 0; e < toks.size(); ++e) ck[e] = s * cv[e];
    }
    r.plan.add_row(toks, ck, cv, items.position[ju], static_cast<std::int64_t>(toks.size()));
  }
  return r;
}

void ems_prefill_scores(const LayerInput& in, int kv_head, const EmsConfig& c, VecX& glo, VecX& loc) {
  const int hq = static_cast<int>(in.q.size()), hkv = static_cast<int>(in.k.size());
  const int g = hq / hkv;
  const MatX& K = in.k[static_cast<std::size_t>(kv_head)];
  std::vector<VecX> gl(static_cast<std::size_t>(hq)), lo(static_cast<std::size_t>(hq));
  for (int h = kv_head * g; h < (kv_head + 1) * g; ++h) {
    gl[static_cast<std::size_t>(h)] = accumulated_attention(in, h, false);
    lo[static_cast<std::size_t>(h)] = window_scores(in.q[static_cast<std::size_t>(h)], K, c.obs_window, Reduce::kSum);
  }
  glo = group_reduce(gl, kv_head, hq, hkv, c.group);
  loc = group_reduce(lo, kv_head, hq, hkv, c.group);
}

void ems_parse_share(const std::string& text, EmsConfig& c) {
  if (text == "adaptive") {
    c.share_fixed = false;
    return;
  }
  double v = -1;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p != text.data() + text.size()) v = -1;
  if (!(v >= 0 && v <= 1))
    throw Error(ErrorKind::kUsage, "ems: parameter 'share' must be adaptive or a fixed share x with 0 <= x <= 1, "
                                   "got '" + text + "'");
  c.share_fixed = true;
  c.share_value = v;
}

EmsConfig ems_config(const Params& p) {
  EmsConfig c;
  c.window = p.integer("window", 0);
  c.obs_window = p.integer("obs_window", 0);
  const std::string comb = p.choice("combiner", {"sum", "max", "weighted"});
  c.combiner = comb == "sum" ? EmsCombiner::kSum : comb == "max" ? EmsCombiner::kMax : EmsCombiner::kWeighted;
  c.lambda = p.real("lambda");
  if (c.lambda < 0 || c.lambda > 1) throw Error(ErrorKind::kUsage, "ems: parameter 'lambda' must be in [0, 1]");
  ems_parse_share(p.text("share"), c);
  c.share_gain = p.real("share_gain");
  if (c.share_gain < 0) throw Error(ErrorKind::kUsage, "ems: parameter 'share_gain' must be >= 0");
  c.similarity = p.choice("similarity", {"kv", "keys"}) == "kv" ? EmsSimilarity::kKeyValue : EmsSimilarity::kKeys;
  c.tau = p.real("tau");
  c.weights = p.choice("merge_weights", {"score", "attention"}) == "score" ? EmsMergeWeights::kScore
                                                                            : EmsMergeWeights::kAttention;
  c.group = p.choice("gqa", {"mean", "max"}) == "mean" ? Reduce::kMean : Reduce::kMax;
  c.recompress = p.choice("decode", {"recompress", "grow"}) == "recompress";
  c.every = p.integer("decode_every", 1);
  return c;
}

namespace {

// Reduces the group's q-head probability vectors (over the kv head's slots).
VecX reduce_probs(const std::vector<VecX>& probs, int kv_head, int hq, int hkv, Reduce r) {
  return group_reduce(probs, kv_head, hq, hkv, r);
}

// Scores of the slots a merged/evicting outer plan leaves: sums over each row.
VecX map_through(const Plan& outer, const VecX& x) {
  VecX y = VecX::Zero(outer.slots());
  for (std::int64_t i = 0; i < outer.slots(); ++i)
    for (std::int64_t e = outer.row_begin(i); e < outer.row_end(i); ++e) y[i] += x[outer.token[static_cast<std::size_t>(e)]];
  return y;
}

class EmsDecoder final : public DecodePolicy {
 public:
  EmsDecoder(const LayerInput& in, std::vector<std::int64_t> budgets, const EmsConfig& c)
      : c_(c), budgets_(std::move(budgets)), hq_(static_cast<int>(in.q.size())), hkv_(static_cast<int>(in.k.size())) {
    const int g = hq_ / hkv_;
    for (int kv = 0; kv < hkv_; ++kv) {
      Head h;
      VecX loc;
      ems_prefill_scores(in, kv, c_, h.token_glo, loc);
      // The last obs_window prompt queries, one row each, reduced over the group.
      const MatX& K = in.k[static_cast<std::size_t>(kv)];
      std::vector<MatX> rows;
      for (int q = kv * g; q < (kv + 1) * g; ++q) rows.push_back(window_attention(in.q[static_cast<std::size_t>(q)], K, c_.obs_window));
      for (Eigen::Index i = 0; i < rows.front().rows(); ++i) {
        std::vector<VecX> per(static_cast<std::size_t>(hq_));
        for (int q = kv * g; q < (kv + 1) * g; ++q) per[static_cast<std::size_t>(q)] = rows[static_cast<std::size_t>(q - kv * g)].row(i).transpose();
        h.token_ring.push_back(group_reduce(per, kv, hq_, hkv_, c_.group));
      }
      heads_.push_back(std::move(h));
    }
  }

  StepPlans before_attend(const DecodeStep& step) override {
    for (std::size_t kv = 0; kv < heads_.size(); ++kv) sync(heads_[kv], (*step.heads)[kv].plan);
    return StepPlans(step.heads->size());
  }

  StepPlans after_attend(const DecodeStep& step, const std::vector<VecX>& probs) override {
    StepPlans out(step.heads->size());
    for (int kv = 0; kv < hkv_; ++kv) {
      const auto ku = static_cast<std::size_t>(kv);
      Head& h = heads_[ku];
      const HeadCache& cache = (*step.heads)[ku];
      sync(h, cache.plan);
      const VecX p = reduce_probs(probs, kv, hq_, hkv_, c_.group);
      h.glo += p;
      if (c_.obs_window > 0) {
        h.ring.push_back(p);
        while (static_cast<std::int64_t>(h.ring.size()) > c_.obs_window) h.ring.pop_front();
      }
      const std::int64_t B = budgets_[ku], m = cache.plan.slots();
      if (m < B + c_.every) continue;
      EmsItems items;
      items.K = &cache.K;
      items.V = &cache.V;
      items.glo = h.glo;
      items.loc = VecX::Zero(m);
      for (const VecX& r : h.ring) items.loc += r;
      items.position = cache.plan.position;
      EmsResult res = ems_compress(items, B, c_);
      h.glo = map_through(res.plan, h.glo);
      for (VecX& r : h.ring) r = map_through(res.plan, r);
      out[ku] = std::move(res.plan);
    }
    return out;
  }

 private:
  struct Head {
    VecX token_glo;               // prefill s_Glo per prompt token
    std::vector<VecX> token_ring;  // prefill window rows per prompt token
    bool started = false;
    VecX glo;                     // per slot
    std::deque<VecX> ring;        // per slot, the last obs_window queries' attention
  };

  // Brings a head's state to the cache's current slots: at the first step the
  // prompt scores are summed over each slot's tokens; new slots start at 0.
  static void sync(Head& h, const Plan& plan) {
    const std::int64_t m = plan.slots();
    if (!h.started) {
      h.started = true;
      auto to_slots = [&](const VecX& tok) {
        VecX y = VecX::Zero(m);
        for (std::int64_t i = 0; i < m; ++i)
          for (std::int64_t e = plan.row_begin(i); e < plan.row_end(i); ++e) {
            const std::int64_t t = plan.token[static_cast<std::size_t>(e)];
            if (t < tok.size()) y[i] += tok[t];
          }
        return y;
      };
      h.glo = to_slots(h.token_glo);
      for (const VecX& r : h.token_ring) h.ring.push_back(to_slots(r));
      return;
    }
    auto grow = [m](VecX& x) {
      const Eigen::Index old = x.size();
      if (old < m) {
        x.conservativeResize(m);
        x.tail(m - old).setZero();
      }
    };
    grow(h.glo);
    for (VecX& r : h.ring) grow(r);
  }

  EmsConfig c_;
  std::vector<std::int64_t> budgets_;
  int hq_, hkv_;
  std::vector<Head> heads_;
};

class Ems final : public Method {
 public:
  Ems(std::string preset, const Params& p) : preset_(std::move(preset)), params_(p.all()), c_(ems_config(p)) {}

  std::string name() const override { return method_name("ems", preset_, params_); }
  Laws laws() const override {
    const BudgetLaw decode = c_.recompress && c_.every == 1 ? BudgetLaw::kExact : BudgetLaw::kNone;
    return {BudgetLaw::kExact, decode, ConservationLaw::kNormPreservingKeys, AllocationLaw::kUniform};
  }

  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    if (budget < 0) throw Error(ErrorKind::kImpossibleBudget, "ems: negative budget " + std::to_string(budget));
    const std::int64_t T = in.tokens();
    std::vector<Plan> plans;
    for (int kv = 0; kv < static_cast<int>(in.k.size()); ++kv) {
      EmsItems items;
      items.K = &in.k[static_cast<std::size_t>(kv)];
      items.V = &in.v[static_cast<std::size_t>(kv)];
      if (T > budget) {
        ems_prefill_scores(in, kv, c_, items.glo, items.loc);
      } else {  // nothing to compress: no scores needed
        items.glo = items.loc = VecX::Zero(T);
      }
      items.position = index_range(0, T);
      plans.push_back(ems_compress(items, budget, c_).plan);
    }
    return LayerPlans::uniform(std::move(plans), budget);
  }

  // The kept set (window, centres, merged) is no threshold on one score:
  // scores are 1 (kept) / -1 (evicted), never a tie by themselves; the head's
  // smallest decision margin (EmsResult::margin) is head_margin, and within
  // delta any difference is a tie (docs/verification.md, "Merge plans").
  std::optional<LayerScores> decision_scores(const LayerInput& in, const LayerPlans& plans,
                                             std::int64_t budget) const override {
    const std::int64_t T = in.tokens();
    LayerScores out;
    if (T > budget && budget >= 0) out.protected_tokens = protected_tokens(T, budget);
    for (int kv = 0; kv < static_cast<int>(in.k.size()); ++kv) {
      double margin = std::numeric_limits<double>::infinity();
      if (T > budget) {
        EmsItems items;
        items.K = &in.k[static_cast<std::size_t>(kv)];
        items.V = &in.v[static_cast<std::size_t>(kv)];
        ems_prefill_scores(in, kv, c_, items.glo, items.loc);
        items.position = index_range(0, T);
        margin = ems_compress(items, budget, c_).margin;
      }
      VecX s = VecX::Constant(T, -1.0);
      for (std::int64_t t : plans.plans[static_cast<std::size_t>(kv)].token) s[t] = 1.0;
      out.per_kv_head.push_back(std::move(s));
      out.head_margin.push_back(margin);
    }
    return out;
  }

  std::unique_ptr<DecodePolicy> decoder(const LayerInput& in, const std::vector<std::int64_t>& budgets) const override {
    if (!c_.recompress) return nullptr;
    return std::make_unique<EmsDecoder>(in, budgets, c_);
  }

  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t budget) const override {
    if (budget < 0) throw Error(ErrorKind::kImpossibleBudget, "ems: negative budget " + std::to_string(budget));
    return index_range(n - std::min({c_.window, budget, n}), n);
  }

 private:
  std::string preset_;
  std::map<std::string, std::string> params_;
  EmsConfig c_;
};

}  // namespace

FamilyInfo ems_family() {
  FamilyInfo f;
  f.family = "ems";
  f.kind = "evict + merge";
  f.when = "prefill + decode";
  f.summary = "Head-wise evict-then-merge: Global-Local score picks centres, the next tokens merge into their most "
              "similar centre (norm-preserving keys), the rest are evicted; merge share adapts per head "
              "(reconstructed).";
  f.params = {
      {"window", "8", "recent tokens kept verbatim, counted in the budget (shrinks to the budget when larger; "
                      "integer >= 0)"},
      {"obs_window", "8", "recent queries whose attention forms the local score s_Loc (integer >= 0)"},
      {"combiner", "sum", "s_GL from the mean-aligned scores: sum | max | weighted (lambda global + (1-lambda) local)"},
      {"lambda", "0.5", "weight of the global score under combiner=weighted, in [0, 1]"},
      {"share", "adaptive", "merge share beta of the non-kept tokens: adaptive (from sparsity and redundancy) | "
                            "x, a fixed share in [0, 1] (0 = plain eviction by s_GL)"},
      {"share_gain", "1", "adaptive beta = clamp(gain * max(0, redundancy) * (1 - sparsity), 0, 1) (real >= 0)"},
      {"similarity", "kv", "assignment and redundancy similarity: kv (cos k * cos v) | keys (cos k)"},
      {"tau", "0", "a to-be-merged token less similar than tau to every centre goes to the zero class (evicted)"},
      {"merge_weights", "score", "merge weights: score (s_GL) | attention (s_Glo), normalised per centre"},
      {"gqa", "mean", "mean | max of the scores of the q heads of a GQA group"},
      {"decode", "recompress", "recompress: compress again when a head reaches budget + decode_every slots | grow"},
      {"decode_every", "1", "decode trigger: compress when a head holds budget + decode_every slots (1 = every "
                            "step once full: exactly the budget after every step)"},
  };
  f.presets = {
      {"paper", {},
       "reconstruction of Li et al. 2024 (arXiv 2412.08521, no official code): Global-Local sum, adaptive share, "
       "kv similarity, tau 0, score weights, recompression while decoding"},
      {"evict-only", {{"share", "0"}},
       "the evict half alone (share 0): top-s_GL eviction, the ablation that isolates the merge"},
  };
  f.make = [](const std::string& preset, const Params& p) { return std::make_unique<Ems>(preset, p); };
  return f;
}

}  // namespace kvscope::ref
