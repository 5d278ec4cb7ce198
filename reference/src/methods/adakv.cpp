#include "kvscope/reference/methods/adakv.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "kvscope/core/error.hpp"

namespace kvscope::ref {
namespace {

// torch.round: half to even.
double round_half_even(double x) {
  const double r = std::round(x);
  return std::abs(x - std::trunc(x)) == 0.5 ? 2.0 * std::round(x / 2.0) : r;
}

std::vector<std::int64_t> non_protected(std::int64_t T, const std::vector<std::int64_t>& prot) {
  std::vector<char> is_prot(static_cast<std::size_t>(T), 0);
  for (std::int64_t j : prot) is_prot[static_cast<std::size_t>(j)] = 1;
  std::vector<std::int64_t> c;
  for (std::int64_t j = 0; j < T; ++j)
    if (!is_prot[static_cast<std::size_t>(j)]) c.push_back(j);
  return c;
}

// Per-head counts of a selection over the flattened [head * T + token] index.
std::vector<std::int64_t> head_counts(const Selection& s, std::size_t heads, std::int64_t T) {
  std::vector<std::int64_t> c(heads, 0);
  for (std::int64_t i : s.kept) ++c[static_cast<std::size_t>(i / T)];
  return c;
}

// FFY0/AdaKV snapkv_utils.py AdaptiveSnapKVCluster.update_kv: optional
// normalisation, global top-(H·B) of the flattened scores, counts c_h.
std::vector<std::int64_t> original_counts(const LayerScores& s, std::int64_t B, const std::vector<std::int64_t>& cand,
                                          bool normalize, const ForEachIndex& for_each_head) {
  const std::size_t H = s.per_kv_head.size();
  // Each head's candidate scores, best first, times its ratio.
  std::vector<std::vector<double>> sorted(H);
  for_each_head(static_cast<int>(H), [&](int head) {
    const auto h = static_cast<std::size_t>(head);
    const VecX& sh = s.per_kv_head[h];
    std::vector<double>& v = sorted[h];
    for (std::int64_t j : cand) {
      if (std::isnan(sh[j]))
        throw Error(ErrorKind::kBadNumber, "score of token " + std::to_string(j) + " of kv head " + std::to_string(h) + " is NaN");
      v.push_back(sh[j]);
    }
    std::sort(v.begin(), v.end(), std::greater<>());
    if (normalize) {  // s_h * (sum of the top-B scores) / (sum of all scores), eq. of the authors' code
      double top = 0, all = 0;
      for (std::size_t i = 0; i < v.size(); ++i) (i < static_cast<std::size_t>(B) ? top : all) += v[i];
      all += top;
      if (all > 0 && std::isfinite(top / all)) {  // reconstructed guard: 0/0 -> no scaling
        const double ratio = top / all;
        // ratio >= 0 (a negative top-B sum makes `all` negative too), so the
        // scaled list stays in order; ties may only grow.
        for (double& x : v) x *= ratio;
      }
    }
  });
  // The global top-(H·B) of the flat [h * T + j] scores, higher first and the
  // lower flat index on ties (top_k's order), counted per head: every score
  // above the (H·B)-th largest, theta, and of the scores equal to theta the
  // lower heads' first.
  std::vector<double> all;
  for (const auto& v : sorted) all.insert(all.end(), v.begin(), v.end());
  const auto K = std::min(static_cast<std::int64_t>(H) * B, static_cast<std::int64_t>(all.size()));
  std::vector<std::int64_t> counts(H, 0);
  if (K <= 0) return counts;
  std::nth_element(all.begin(), all.begin() + (K - 1), all.end(), std::greater<>());
  const double theta = all[static_cast<std::size_t>(K - 1)];
  std::int64_t left = K;
  std::vector<std::int64_t> equal(H);
  for (std::size_t h = 0; h < H; ++h) {  // sorted[h] is descending
    const auto above = std::partition_point(sorted[h].begin(), sorted[h].end(), [&](double x) { return x > theta; });
    const auto at = std::partition_point(above, sorted[h].end(), [&](double x) { return x >= theta; });
    counts[h] = above - sorted[h].begin();
    equal[h] = at - above;
    left -= counts[h];
  }
  for (std::size_t h = 0; h < H; ++h) {
    const std::int64_t take = std::min(equal[h], left);
    counts[h] += take;
    left -= take;
  }
  return counts;
}

// kvpress adakv_press.py AdaKVPress.compress: the top-n_safe of each head are
// safe, the global bottom H (T - C) entries are pruned; returns kept past per head.
std::vector<std::int64_t> kvpress_counts(const LayerScores& s, std::int64_t T, std::int64_t C, std::int64_t P,
                                         const std::vector<std::int64_t>& cand, double alpha) {
  const std::size_t H = s.per_kv_head.size();
  const auto n_safe = static_cast<std::int64_t>(static_cast<double>(C) * alpha);  // int(n_kept * alpha)
  const std::int64_t extra = std::max<std::int64_t>(0, n_safe - P);  // the window outranks everything (sentinel)
  VecX flat = VecX::Zero(static_cast<Eigen::Index>(H) * T);
  std::vector<std::int64_t> rest;
  for (std::size_t h = 0; h < H; ++h) {
    const VecX& sh = s.per_kv_head[h];
    const Selection safe = top_k(sh, cand, extra);
    std::vector<char> is_safe(static_cast<std::size_t>(T), 0);
    for (std::int64_t j : safe.kept) is_safe[static_cast<std::size_t>(j)] = 1;
    for (std::int64_t j : cand) {
      const std::int64_t i = static_cast<std::int64_t>(h) * T + j;
      flat[i] = sh[j];
      if (!is_safe[static_cast<std::size_t>(j)]) rest.push_back(i);
    }
  }
  std::vector<std::int64_t> counts = head_counts(top_k(flat, rest, static_cast<std::int64_t>(H) * (C - P - extra)), H, T);
  for (auto& c : counts) c += extra;
  return counts;
}

}  // namespace

std::vector<std::int64_t> adakv_round_budgets(const std::vector<std::int64_t>& counts, std::int64_t B, double alpha,
                                              std::int64_t cap) {
  const auto H = static_cast<std::int64_t>(counts.size());
  const auto floor_cap = static_cast<std::int64_t>(static_cast<double>(B) * alpha);  // int(base_capacity * ratio)
  std::vector<double> raw;
  std::vector<std::int64_t> b;
  std::int64_t sum = 0;
  for (std::int64_t c : counts) {
    raw.push_back(static_cast<double>(c) * (1.0 - alpha) + static_cast<double>(floor_cap));
    b.push_back(std::min(cap, static_cast<std::int64_t>(round_half_even(raw.back()))));
    sum += b.back();
  }
  // Repair (reconstructed): hand back tokens to the largest remainders until the
  // head-shared law H·B ± H holds; the authors' formula alone can miss it.
  while (sum < H * B - H) {
    std::int64_t best = -1;
    for (std::int64_t h = 0; h < H; ++h) {
      const auto u = static_cast<std::size_t>(h);
      if (b[u] < cap && (best < 0 || raw[u] - static_cast<double>(b[u]) >
                                         raw[static_cast<std::size_t>(best)] - static_cast<double>(b[static_cast<std::size_t>(best)])))
        best = h;
    }
    if (best < 0) break;
    ++b[static_cast<std::size_t>(best)];
    ++sum;
  }
  return b;
}

std::vector<std::int64_t> adakv_budgets(const LayerScores& scores, std::int64_t T, std::int64_t C,
                                        const AdaKVOptions& o, const ForEachIndex& for_each_head) {
  const std::size_t H = scores.per_kv_head.size();
  const auto P = static_cast<std::int64_t>(scores.protected_tokens.size());
  // Nothing to share: the budget covers the prompt (the original skips
  // compression when B > L - w) or leaves no past slot.
  if (C >= T || C <= P) return std::vector<std::int64_t>(H, C);
  const std::vector<std::int64_t> cand = non_protected(T, scores.protected_tokens);
  std::vector<std::int64_t> past;
  if (o.allocation == AdaAllocation::kOriginal)
    past = adakv_round_budgets(original_counts(scores, C - P, cand, o.normalize, or_in_turn(for_each_head)), C - P, o.alpha,
                               static_cast<std::int64_t>(cand.size()));
  else
    past = kvpress_counts(scores, T, C, P, cand, o.alpha);
  for (auto& b : past) b += P;
  return past;
}

MethodSpec adakv_base(const Params& p) {
  // Base parameters use '/' for ':' (the CLI splits the outer spec on ':'):
  // base=snapkv@adakv/window=16 is snapkv@adakv:window=16.
  std::string base = p.text("base");
  std::replace(base.begin(), base.end(), '/', ':');
  return MethodSpec::parse(base);
}

AdaKVOptions adakv_options(const Params& p) {
  AdaKVOptions o;
  o.alpha = p.real("alpha");
  if (o.alpha < 0 || o.alpha > 1)
    throw Error(ErrorKind::kUsage, "adakv: parameter 'alpha' must be in [0, 1], got " + p.text("alpha"));
  o.normalize = p.boolean("normalize");
  o.allocation = p.choice("allocation", {"original", "kvpress"}) == "original" ? AdaAllocation::kOriginal
                                                                                : AdaAllocation::kKvpress;
  return o;
}

namespace {

class AdaKV final : public Method {
 public:
  AdaKV(std::string preset, const Params& p) : preset_(std::move(preset)), params_(p.all()), o_(adakv_options(p)) {
    base_ = make_method(adakv_base(p));
    scorer_ = base_->scorer();
    if (!scorer_)
      throw Error(ErrorKind::kUsage, "adakv: base '" + p.text("base") +
                                         "' has no prefill scorer (AdaKV wraps score-then-top-k methods, e.g. snapkv)");
  }

  std::string name() const override { return method_name("adakv", preset_, params_); }
  Laws laws() const override {
    return {BudgetLaw::kExact, BudgetLaw::kNone, ConservationLaw::kEviction, AllocationLaw::kHeadShared};
  }

  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    const LayerScores s = scorer_->score(in, budget);
    const std::int64_t T = in.tokens();
    LayerPlans out;
    out.head_budgets = adakv_budgets(s, T, budget, o_);
    // Within a head both allocations keep its top-B_h (the global selection's
    // threshold cuts every head at its own rank), so per-head top-k is exact.
    out.plans = select_per_head(s, T, out.head_budgets, name());
    return out;
  }

  std::optional<LayerScores> decision_scores(const LayerInput& in, const LayerPlans&,
                                             std::int64_t budget) const override {
    return scorer_->score(in, budget);
  }

  std::unique_ptr<DecodePolicy> decoder(const LayerInput&, const std::vector<std::int64_t>&) const override {
    return nullptr;
  }

  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t budget) const override {
    return base_->protected_tokens(n, budget);
  }

 private:
  std::string preset_;
  std::map<std::string, std::string> params_;
  std::unique_ptr<Method> base_;
  const Scorer* scorer_ = nullptr;
  AdaKVOptions o_;
};

}  // namespace

FamilyInfo adakv_family() {
  FamilyInfo f;
  f.family = "adakv";
  f.kind = "evict, per-head budgets (wrapper)";
  f.when = "prefill";
  f.summary = "Share a layer's H·B past slots among its kv heads by a global top-k of a base method's scores.";
  f.params = {
      {"base", "snapkv@adakv",
       "the wrapped score-then-top-k method, NAME[@PRESET] with its own parameters after '/' instead of ':' "
       "(e.g. snapkv@kvpress/window=16)"},
      {"alpha", "0.2", "floor fraction in [0, 1]: every head keeps at least floor(alpha B) past tokens (original) "
                       "or int(alpha C) tokens (kvpress alpha_safeguard)"},
      {"normalize", "true", "original allocation: scale head h's scores by sum(top-B s_h) / sum(s_h) first"},
      {"allocation", "original",
       "original (FFY0/AdaKV, KVCache-Factory: B_h = round(c_h (1 - alpha) + floor(alpha B))) | kvpress "
       "(AdaKVPress: top int(alpha C) per head safe, global bottom pruning)"},
  };
  f.presets = {
      {"paper", {{"base", "snapkv@adakv"}, {"alpha", "0.2"}, {"normalize", "true"}, {"allocation", "original"}},
       "Feng et al. 2024 and FFY0/AdaKV adaptive_snapkv/monkeypatch/snapkv_utils.py (floor_alpha 0.2, "
       "normalize True, SnapKV mean scores with maxpool 7)"},
      {"kvpress", {{"base", "snapkv@kvpress"}, {"alpha", "0.2"}, {"normalize", "false"}, {"allocation", "kvpress"}},
       "NVIDIA kvpress AdaKVPress(SnapKVPress(), alpha_safeguard=0.2) (adakv_press.py)"},
  };
  f.make = [](const std::string& preset, const Params& p) { return std::make_unique<AdaKV>(preset, p); };
  return f;
}

}  // namespace kvscope::ref
