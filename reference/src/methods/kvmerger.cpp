#include "kvscope/reference/methods/kvmerger.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <span>
#include <sstream>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/scorer.hpp"

namespace kvscope::ref {

namespace {

std::int64_t ceil_count(double fraction, std::int64_t n) {
  // The slack keeps e.g. 0.17 * 100 = 17.000000000000004 from rounding up to 18.
  const double x = fraction * static_cast<double>(n);
  return std::clamp<std::int64_t>(static_cast<std::int64_t>(std::ceil(x - 1e-9)), 0, n);
}

}  // namespace

std::int64_t KVMergerConfig::recent_count(std::int64_t n) const { return ceil_count(recent, n); }

std::int64_t KVMergerConfig::heavy_count(std::int64_t n) const {
  return std::min(ceil_count(heavy, n), n - recent_count(n));
}

bool KVMergerConfig::skipped(int layer, int layers) const {
  for (int s : skip_layers)
    if (s == layer || (s < 0 && layers > 0 && layers + s == layer)) return true;
  return false;
}

double key_cosine(const VecX& a, const VecX& b) {
  const double na = a.norm(), nb = b.norm();
  if (na == 0.0 && nb == 0.0) return 1.0;
  if (na == 0.0 || nb == 0.0) return 0.0;
  return std::clamp(a.dot(b) / (na * nb), -1.0, 1.0);
}

std::vector<double> kvmerger_weights(const MatX& K, const std::vector<std::int64_t>& set, std::size_t pivot,
                                     const KVMergerConfig& c, double* sigma_out) {
  const std::size_t m = set.size();
  std::vector<double> dist2(m);
  double dist_sum = 0;
  for (std::size_t i = 0; i < m; ++i) {
    dist2[i] = (K.row(set[pivot]) - K.row(set[i])).squaredNorm();
    dist_sum += std::sqrt(dist2[i]);
  }
  auto kernel = [&](double sigma, std::vector<double>& g) {
    // d = 0 (the pivot itself, equal keys) gives 1 even when 2 sigma^2 underflows.
    for (std::size_t i = 0; i < m; ++i)
      g[i] = dist2[i] == 0.0 || !(sigma > 0) ? 1.0 : std::exp(-dist2[i] / (2 * sigma * sigma));
  };
  const double sqrt2m = std::sqrt(2.0) * static_cast<double>(m);
  double sigma = 0;
  std::vector<double> g(m, 1.0);
  switch (c.sigma_mode) {
    case KVMergerConfig::Sigma::kMeanDistance:
      sigma = dist_sum / sqrt2m;  // [RECON] mean distance to the pivot over sqrt(2)
      break;
    case KVMergerConfig::Sigma::kFixed:
      sigma = c.sigma;
      break;
    case KVMergerConfig::Sigma::kLiteral: {
      // Eq. 4 read literally: sigma = sum_i g_i(sigma) / (sqrt(2) |S|). The map is
      // increasing and bounded by 1/sqrt(2); iterating from that bound decreases
      // monotonically to the largest fixed point.
      sigma = 1.0 / std::sqrt(2.0);
      for (int it = 0; it < 500; ++it) {
        kernel(sigma, g);
        double s = 0;
        for (double x : g) s += x;
        const double next = s / sqrt2m;
        const bool done = std::abs(next - sigma) <= 1e-15 * sigma;
        sigma = next;
        if (done) break;
      }
      break;
    }
  }
  kernel(sigma, g);
  double total = 0;
  for (double x : g) total += x;  // >= 1: the pivot's own g is exp(0) = 1
  std::vector<double> w(m);
  for (std::size_t i = 0; i < m; ++i) w[i] = g[i] / total;
  if (sigma_out) *sigma_out = sigma;
  return w;
}

namespace {

/// Margin of a top-k decision relative to the scores' scale (0 below the
/// fp32-unresolvable 1e-30, as compare_selection's absolute slack).
double relative_margin(const Selection& s, const VecX& score, std::span<const std::int64_t> candidates) {
  if (!std::isfinite(s.margin)) return std::numeric_limits<double>::infinity();
  if (s.margin <= 1e-30) return 0.0;
  double scale = 0;
  for (std::int64_t j : candidates) scale = std::max(scale, std::abs(score[j]));
  return scale > 0 ? s.margin / scale : 0.0;
}

}  // namespace

KVMergerEdges kvmerger_edges(const VecX& cosine, const VecX& score, std::int64_t budget, const KVMergerConfig& c) {
  return kvmerger_edges(cosine, score, budget, c, [](const VecX& s, std::span<const std::int64_t> cand, std::int64_t k) {
    return top_k(s, cand, k);
  });
}

KVMergerEdges kvmerger_edges(const VecX& cosine, const VecX& score, std::int64_t budget, const KVMergerConfig& c,
                             const TopKFn& select) {
  const std::int64_t T = score.size();
  KVMergerEdges out;
  out.margin = std::numeric_limits<double>::infinity();
  // (a) Protection: the recent band and the heaviest of the other tokens.
  const std::int64_t r = c.recent_count(T);
  std::vector<char> prot(static_cast<std::size_t>(T), 0);
  for (std::int64_t j = T - r; j < T; ++j) prot[static_cast<std::size_t>(j)] = 1;
  const std::vector<std::int64_t> heavy_candidates = index_range(0, T - r);
  const Selection heavy = select(score, heavy_candidates, c.heavy_count(T));
  if (!heavy.kept.empty()) out.margin = std::min(out.margin, relative_margin(heavy, score, heavy_candidates));
  for (std::int64_t j : heavy.kept) prot[static_cast<std::size_t>(j)] = 1;
  for (std::int64_t j = 0; j < T; ++j)
    if (prot[static_cast<std::size_t>(j)]) out.protected_tokens.push_back(j);

  // (b) Merge edges between adjacent unprotected tokens (Algorithm 1's chaining rule).
  // One pass over the edges; whether a cosine clears eps is unpredictable,
  // so it is counted rather than branched on.
  std::vector<char>& merge = out.merge;
  merge.assign(static_cast<std::size_t>(std::max<std::int64_t>(T - 1, 0)), 0);
  const bool by_threshold = c.mode != KVMergerConfig::Mode::kBudget;
  std::int64_t merged = 0, eligible = 0, n_rest = 0;
  std::vector<std::int64_t> rest(merge.size());  // eligible edges the threshold left
  std::array<double, 4> near;  // min |cosine - eps|, four interleaved chains (min is exact in any order)
  near.fill(std::numeric_limits<double>::infinity());
  for (std::int64_t j = 0; j + 1 < T; ++j) {
    if (prot[static_cast<std::size_t>(j)] || prot[static_cast<std::size_t>(j + 1)]) continue;
    ++eligible;
    const bool take = by_threshold && cosine[j] > c.eps;
    double& chain = near[static_cast<std::size_t>(j % 4)];
    if (by_threshold) chain = std::min(chain, std::abs(cosine[j] - c.eps));
    merge[static_cast<std::size_t>(j)] = take ? 1 : 0;
    merged += take ? 1 : 0;
    rest[static_cast<std::size_t>(n_rest)] = j;
    n_rest += take ? 0 : 1;
  }
  rest.resize(static_cast<std::size_t>(n_rest));
  for (double m : near) out.margin = std::min(out.margin, m);
  if (c.mode != KVMergerConfig::Mode::kThreshold && T - merged > budget) {
    // Budget/capped: the highest-cosine remaining edges (lower index on ties)
    // until exactly T - B edges are merged: a contiguity-constrained
    // agglomerative clustering, equivalent to the chaining rule at the
    // threshold eps* = the cosine of the last edge taken.
    const std::int64_t need = T - budget - merged;
    if (static_cast<std::int64_t>(rest.size()) < need)
      throw Error(ErrorKind::kImpossibleBudget,
                  "kvmerger: budget " + std::to_string(budget) + " needs " + std::to_string(T - budget) +
                      " merges of " + std::to_string(T) + " tokens, but only " + std::to_string(eligible) +
                      " adjacent pairs are unprotected (" + std::to_string(r) + " recent + " +
                      std::to_string(heavy.kept.size()) + " heavy tokens protected)");
    const Selection taken = select(cosine, rest, need);
    if (std::isfinite(taken.margin)) out.margin = std::min(out.margin, taken.margin);  // cosines: scale 1
    for (std::int64_t j : taken.kept) merge[static_cast<std::size_t>(j)] = 1;
  }
  return out;
}

Plan kvmerger_head_plan(const MatX& K, const VecX& score, std::int64_t budget, const KVMergerConfig& c,
                        std::vector<std::int64_t>* protected_out) {
  const std::int64_t T = K.rows();
  if (T <= budget) {  // the budget covers the cache: nothing to compress
    if (protected_out) protected_out->clear();
    return Plan::identity(T);
  }
  VecX cosine = VecX::Zero(std::max<std::int64_t>(T - 1, 0));
  for (std::int64_t j = 0; j + 1 < T; ++j) cosine[j] = key_cosine(K.row(j).transpose(), K.row(j + 1).transpose());
  const KVMergerEdges edges = kvmerger_edges(cosine, score, budget, c);
  if (protected_out) *protected_out = edges.protected_tokens;
  const std::vector<char>& merge = edges.merge;

  // (c) Gaussian-kernel weighted merging of every set into its pivot.
  Plan p;
  p.n = T;
  std::vector<std::int64_t> set;
  std::vector<double> ck, cv;
  for (std::int64_t j = 0; j < T; ++j) {
    set.push_back(j);
    if (j + 1 < T && merge[static_cast<std::size_t>(j)]) continue;
    if (set.size() == 1) {
      p.add_kept(j);
    } else {
      std::size_t pivot = 0;  // argmax score, lowest index on ties
      for (std::size_t i = 1; i < set.size(); ++i)
        if (score[set[i]] > score[set[pivot]]) pivot = i;
      const std::vector<double> w = kvmerger_weights(K, set, pivot, c);
      const double scale = c.scaled_values ? static_cast<double>(set.size()) : 1.0;
      ck = w;
      cv.resize(w.size());
      for (std::size_t i = 0; i < w.size(); ++i) cv[i] = scale * w[i];
      p.add_row(set, ck, cv, set[pivot], static_cast<std::int64_t>(set.size()));
    }
    set.clear();
  }
  return p;
}

KVMergerConfig kvmerger_config(const Params& p) {
  KVMergerConfig c;
  const std::string mode = p.choice("mode", {"threshold", "budget", "capped"});
  c.mode = mode == "budget" ? KVMergerConfig::Mode::kBudget
           : mode == "capped" ? KVMergerConfig::Mode::kCapped
                              : KVMergerConfig::Mode::kThreshold;
  c.eps = p.real("eps");
  const double unit = p.choice("protect_unit", {"percent", "fraction"}) == "percent" ? 0.01 : 1.0;
  for (const char* name : {"recent", "heavy"}) {
    const double v = p.real(name) * unit;
    if (v < 0 || v > 1)
      throw Error(ErrorKind::kUsage, std::string("kvmerger: parameter '") + name + "' must be a share in [0, 1] (" +
                                         p.text("protect_unit") + "), got " + p.text(name));
    (std::string(name) == "recent" ? c.recent : c.heavy) = v;
  }
  const std::string sm = p.choice("sigma_mode", {"mean_dist_over_sqrt2", "fixed", "literal"});
  c.sigma_mode = sm == "fixed" ? KVMergerConfig::Sigma::kFixed
                 : sm == "literal" ? KVMergerConfig::Sigma::kLiteral
                                   : KVMergerConfig::Sigma::kMeanDistance;
  c.sigma = p.real("sigma");
  if (!(c.sigma > 0)) throw Error(ErrorKind::kUsage, "kvmerger: parameter 'sigma' must be > 0, got " + p.text("sigma"));
  c.scaled_values = p.choice("values", {"scaled", "convex"}) == "scaled";
  c.gqa = parse_reduce(p.text("gqa"), "kvmerger: gqa");
  const std::string& skip = p.text("skip_layers");
  if (skip != "none") {
    std::stringstream ss(skip);
    std::string item;
    while (std::getline(ss, item, ',')) {
      try {
        std::size_t used = 0;
        const int v = std::stoi(item, &used);
        if (used != item.size()) throw std::invalid_argument(item);
        c.skip_layers.push_back(v);
      } catch (const std::exception&) {
        throw Error(ErrorKind::kUsage, "kvmerger: parameter 'skip_layers' must be none or a comma-separated list of "
                                       "layer indices (negative from the end), got '" + skip + "'");
      }
    }
  }
  return c;
}

namespace {

class KVMerger final : public Method {
 public:
  KVMerger(std::string preset, const Params& p) : preset_(std::move(preset)), params_(p.all()), c_(kvmerger_config(p)) {}

  std::string name() const override { return method_name("kvmerger", preset_, params_); }

  Laws laws() const override {
    Laws l;
    l.prefill_budget = c_.mode == KVMergerConfig::Mode::kBudget   ? BudgetLaw::kExact
                       : c_.mode == KVMergerConfig::Mode::kCapped ? BudgetLaw::kAtMost
                                                                  : BudgetLaw::kNone;
    l.decode_budget = BudgetLaw::kNone;  // prefill only: decoded tokens are appended
    l.conservation = c_.scaled_values ? ConservationLaw::kMergeScaledValues : ConservationLaw::kRowConvex;
    // Skipped layers keep the whole prompt: their heads answer to max(B, T).
    l.allocation = c_.skip_layers.empty() ? AllocationLaw::kUniform : AllocationLaw::kPerLayer;
    return l;
  }

  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    const std::int64_t T = in.tokens();
    const int q_heads = static_cast<int>(in.q.size()), kv_heads = static_cast<int>(in.k.size());
    const int layers = in.meta ? in.meta->layers : 0;
    if (c_.skipped(in.layer, layers))
      return LayerPlans::uniform(std::vector<Plan>(in.k.size(), Plan::identity(T)), std::max(budget, T));
    std::vector<VecX> acc;
    for (int h = 0; h < q_heads; ++h) acc.push_back(accumulated_attention(in, h, false));
    std::vector<Plan> plans;
    for (int kv = 0; kv < kv_heads; ++kv)
      plans.push_back(kvmerger_head_plan(in.k[static_cast<std::size_t>(kv)], group_reduce(acc, kv, q_heads, kv_heads, c_.gqa),
                                         budget, c_));
    return LayerPlans::uniform(std::move(plans), budget);
  }

  std::unique_ptr<DecodePolicy> decoder(const LayerInput&, const std::vector<std::int64_t>&) const override {
    return nullptr;
  }

  // The pivot scores per kv head and the smallest margin of the head's
  // decisions (heavy set, merged edges, pivots) for the differential harness.
  std::optional<LayerScores> decision_scores(const LayerInput& in, const LayerPlans&,
                                             std::int64_t budget) const override {
    const std::int64_t T = in.tokens();
    const int q_heads = static_cast<int>(in.q.size()), kv_heads = static_cast<int>(in.k.size());
    const int layers = in.meta ? in.meta->layers : 0;
    const bool skipped = c_.skipped(in.layer, layers);
    LayerScores out;
    std::vector<VecX> acc;
    if (!skipped)
      for (int h = 0; h < q_heads; ++h) acc.push_back(accumulated_attention(in, h, false));
    for (int kv = 0; kv < kv_heads; ++kv) {
      const MatX& K = in.k[static_cast<std::size_t>(kv)];
      out.per_kv_head.push_back(skipped ? VecX::Zero(T) : group_reduce(acc, kv, q_heads, kv_heads, c_.gqa));
      double margin = std::numeric_limits<double>::infinity();
      if (!skipped && T > budget) {
        const VecX& score = out.per_kv_head.back();
        VecX cosine = VecX::Zero(std::max<std::int64_t>(T - 1, 0));
        for (std::int64_t j = 0; j + 1 < T; ++j) cosine[j] = key_cosine(K.row(j).transpose(), K.row(j + 1).transpose());
        const KVMergerEdges e = kvmerger_edges(cosine, score, budget, c_);
        margin = e.margin;
        const double scale = score.cwiseAbs().maxCoeff();
        // Pivots: the best score of each set against its runner-up.
        for (std::int64_t b = 0; b < T;) {
          std::int64_t end = b + 1;
          while (end < T && e.merge[static_cast<std::size_t>(end - 1)]) ++end;
          if (end - b > 1) {
            double best = -std::numeric_limits<double>::infinity(), second = best;
            for (std::int64_t j = b; j < end; ++j) {
              if (score[j] > best) second = best, best = score[j];
              else if (score[j] > second) second = score[j];
            }
            const double gap = best - second;
            margin = std::min(margin, gap <= 1e-30 || !(scale > 0) ? 0.0 : gap / scale);
          }
          b = end;
        }
      }
      out.head_margin.push_back(margin);
    }
    return out;
  }

  // The recent band of an n-token cache (heavy hitters are data-dependent; the
  // unit tests check them). n - ceil(rho n) never decreases, so the band of a
  // longer cache lies inside the prompt's band plus the appended tokens.
  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t budget) const override {
    if (n <= budget) return {};
    return index_range(n - c_.recent_count(n), n);
  }

 private:
  std::string preset_;
  std::map<std::string, std::string> params_;
  KVMergerConfig c_;
};

}  // namespace

FamilyInfo kvmerger_family() {
  FamilyInfo f;
  f.family = "kvmerger";
  f.kind = "merge";
  f.when = "prefill";
  f.summary =
      "Merge maximal runs of adjacent similar keys (cos > eps) into their pivot with Gaussian-kernel weights; "
      "recent and heavy-hitter tokens protected.";
  f.params = {
      {"mode", "threshold",
       "threshold: merge every adjacent unprotected pair with cos > eps (paper; size data-dependent, budget law "
       "none); budget: merge the highest-cosine adjacent pairs until exactly B slots (eps ignored; law exact); "
       "capped: threshold, then highest-cosine pairs until <= B (law at-most). Every mode is the identity when "
       "T <= B"},
      {"eps", "0.75", "cosine threshold of the chaining rule (paper: 0.75)"},
      {"recent", "0.17", "protected most recent tokens: ceil(share * T), the share in protect_unit"},
      {"heavy", "0.12", "protected heavy hitters (highest accumulated attention outside the recent band): "
                        "ceil(share * T), the share in protect_unit"},
      {"protect_unit", "percent",
       "unit of recent and heavy: percent (the paper's '0.17%' read literally) or fraction (0.17 = 17%)"},
      {"sigma_mode", "mean_dist_over_sqrt2",
       "Gaussian kernel width per set: mean_dist_over_sqrt2 (sum_i |k_p - k_i| / (sqrt2 |S|), reconstruction), "
       "fixed (the sigma parameter; the paper's ablation best is 5), literal (Eq. 4's fixed point "
       "sigma = sum_i g_i / (sqrt2 |S|))"},
      {"sigma", "5.0", "kernel width for sigma_mode=fixed (> 0)"},
      {"values", "scaled", "scaled: value weights times |S| (paper, rows sum to |S|); convex: value weights = key "
                           "weights (rows sum to 1)"},
      {"gqa", "mean", "accumulated attention of a group's q heads reduced to the kv head: mean, max or sum"},
      {"skip_layers", "none",
       "layers left uncompressed: none or a comma-separated list, negative from the end (arXiv v1: 0,1,-1)"},
  };
  f.presets = {
      {"paper",
       {{"mode", "threshold"}, {"eps", "0.75"}, {"recent", "0.17"}, {"heavy", "0.12"}, {"protect_unit", "percent"},
        {"sigma_mode", "mean_dist_over_sqrt2"}, {"values", "scaled"}, {"gqa", "mean"}, {"skip_layers", "none"}},
       "arXiv 2407.08454 / OpenReview Q5VlpYRxGF as quoted by reviews: eps 0.75, 0.17% recent + 0.12% heavy (50% "
       "setting), |S|-scaled values; sigma reconstructed (research notes 3.4c)"},
      {"budget",
       {{"mode", "budget"}, {"eps", "0.75"}, {"recent", "0.17"}, {"heavy", "0.12"}, {"protect_unit", "percent"},
        {"sigma_mode", "mean_dist_over_sqrt2"}, {"values", "convex"}, {"gqa", "mean"}, {"skip_layers", "none"}},
       "exact per-head budget (reconstruction; the compaction port hits a target size and divides the |S| "
       "scaling back out): highest-cosine adjacent pairs first, convex values"},
      {"paper35",
       {{"mode", "threshold"}, {"eps", "0.75"}, {"recent", "0.08"}, {"heavy", "0.02"}, {"protect_unit", "percent"},
        {"sigma_mode", "mean_dist_over_sqrt2"}, {"values", "scaled"}, {"gqa", "mean"}, {"skip_layers", "none"}},
       "the paper's 35% setting as quoted by reviews: 0.08% recent + 0.02% heavy"},
      {"v1",
       {{"mode", "threshold"}, {"eps", "0.75"}, {"recent", "0.17"}, {"heavy", "0.12"}, {"protect_unit", "percent"},
        {"sigma_mode", "mean_dist_over_sqrt2"}, {"values", "scaled"}, {"gqa", "mean"}, {"skip_layers", "0,1,-1"}},
       "arXiv v1 text (third-party note): the first two layers and the last one are not merged"},
  };
  f.make = [](const std::string& preset, const Params& p) { return std::make_unique<KVMerger>(preset, p); };
  return f;
}

}  // namespace kvscope::ref
