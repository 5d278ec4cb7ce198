#include "kvscope/reference/methods/cam.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <utility>
#include <vector>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/streaming_llm.hpp"
#include "kvscope/reference/scorer.hpp"
#include "kvscope/reference/scores.hpp"

namespace kvscope::ref {

double cam_uniform(std::uint64_t seed, int layer, int kv_head, std::int64_t token) {
  auto mix = [](std::uint64_t z) {  // SplitMix64 finaliser
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  std::uint64_t h = mix(seed);
  h = mix(h ^ static_cast<std::uint64_t>(layer));
  h = mix(h ^ static_cast<std::uint64_t>(kv_head));
  h = mix(h ^ static_cast<std::uint64_t>(token));
  return static_cast<double>(h >> 11) * 0x1.0p-53;  // 53 random bits: exact in double, < 1
}

namespace {

using Gate = CamGate;
using Denominator = CamDenominator;
using Score = CamScore;
using Prefill = CamPrefill;
using Config = CamConfig;

// A value hand-off decided by one eviction pass: slot `from` gives coef * V to each slot in `to`.
struct Merge {
  std::int64_t from;
  std::vector<std::int64_t> to;
  double coef;
};
// StreamingLLM evicts one block of slots, [first, end) of the pass's m slots;
// the others are kept, in order. Ranges, not a list of the kept slots: the
// prompt stream runs a pass per token over a full cache.
struct Pass {
  std::int64_t m = 0, first = 0, end = 0;
  std::vector<Merge> merges;
  bool kept(std::int64_t s) const { return s < first || s >= end; }
};

// p of an evicted slot given the pass's window W (and its kept slots).
using ProbFn = std::function<double(std::int64_t e, const std::vector<std::int64_t>& win, const Pass& pass)>;

// One eviction pass over a head whose slots hold the keys `key` (sequence order):
// StreamingLLM evicts the oldest non-sink slots down to `budget`; the latest
// `candidates` evicted ones may hand their value to the next m kept slots.
// Per step this is the paper's Algorithm 1 (one token); with candidates < evicted
// it is kvpress CAMPress's bulk pass (merge candidates = the newest evicted).
Pass evict_pass(const std::vector<std::int64_t>& key, std::int64_t budget, std::int64_t candidates,
                const ProbFn& prob, const Config& c, int layer, int head, double* margin = nullptr) {
  const auto m = static_cast<std::int64_t>(key.size());
  const std::int64_t first = std::min(c.sinks, m), end = first + (m - budget);
  Pass out{m, first, end, {}};
  if (c.gate == Gate::kNever) return out;  // plain eviction, bit for bit
  const std::int64_t width = c.window > 0 ? c.window : budget - c.sinks;
  // W = the next m kept slots after the evicted block (shared by all its tokens), truncated at the end.
  std::vector<std::int64_t> win;
  for (std::int64_t s = end; s < std::min(m, end + width); ++s) win.push_back(s);
  if (win.empty()) return out;
  const double coef = 1.0 / static_cast<double>(c.rescale ? static_cast<std::int64_t>(win.size()) : width);
  for (std::int64_t e = std::max(first, end - candidates); e < end; ++e) {
    bool merge = c.gate == Gate::kAlways;
    if (!merge) {
      const double p = prob(e, win, out);
      const double u = cam_uniform(c.seed, layer, head, key[static_cast<std::size_t>(e)]);
      merge = u < p;
      if (margin) *margin = std::min(*margin, std::abs(u - p));  // p in [0, 1]: scale 1
    }
    if (merge) out.merges.push_back({e, win, coef});
  }
  return out;
}

// p_i = clamp(Ā_i / denom, 0, 1) over the keys' Ā; 0/0 -> 0 and x/0 -> 1 (the
// NaN/Inf guards of kvpress and the streaming code). `tiny` (nullable) is set
// when the denominator is below fp32's resolution (a backend may see 0).
ProbFn abar_prob(const std::vector<std::int64_t>& key, const std::vector<double>& abar, const Config& c,
                 bool* tiny = nullptr) {
  return [&key, &abar, &c, tiny](std::int64_t e, const std::vector<std::int64_t>& win, const Pass& pass) {
    auto score = [&](std::int64_t slot) { return abar[static_cast<std::size_t>(key[static_cast<std::size_t>(slot)])]; };
    double mean = 0, max = 0;
    for (std::int64_t s : win) mean += score(s) / static_cast<double>(win.size());
    if (c.denominator == Denominator::kMax)
      for (std::int64_t s = 0; s < pass.m; ++s)
        if (pass.kept(s)) max = std::max(max, score(s));
    const double denom = c.denominator == Denominator::kMean ? mean : std::max(max, score(e));
    // Below 1e-30 fp32 may see 0 (or a different ratio): p may come out otherwise.
    if (tiny && ((denom > 0 && denom <= 1e-30) || (denom == 0 && score(e) > 0 && score(e) <= 1e-30))) *tiny = true;
    const double p = score(e) / denom;
    return std::isnan(p) ? 0.0 : std::clamp(p, 0.0, 1.0);
  };
}

// The key token of every slot of a value-hand-off plan (the entry with coef_k != 0).
std::vector<std::int64_t> key_tokens(const Plan& p) {
  std::vector<std::int64_t> key;
  for (std::int64_t i = 0; i < p.slots(); ++i)
    for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e)
      if (p.coef_k[static_cast<std::size_t>(e)] != 0.0) {
        key.push_back(p.token[static_cast<std::size_t>(e)]);
        break;
      }
  return key;
}

// A pass as a plan over the current slots: kept slot t = its own slot plus (coef_k 0, coef_v coef) of each giver.
Plan pass_plan(const Pass& pass, const Plan& current) {
  std::map<std::int64_t, std::vector<std::pair<std::int64_t, double>>> gifts;
  for (const Merge& g : pass.merges)
    for (std::int64_t t : g.to) gifts[t].emplace_back(g.from, g.coef);
  Plan p;
  p.n = current.slots();
  for (std::int64_t t = 0; t < pass.m; ++t) {
    if (!pass.kept(t)) continue;
    std::vector<std::int64_t> tok{t};
    std::vector<double> ck{1.0}, cv{1.0};
    for (const auto& [from, coef] : gifts[t]) {
      tok.push_back(from);
      ck.push_back(0.0);
      cv.push_back(coef);
    }
    p.add_row(tok, ck, cv, current.position[static_cast<std::size_t>(t)], 1);
  }
  return p;
}

// Adds one query step's attention (mean over the GQA group) to Ā, by original token.
void accumulate(std::vector<double>& abar, const std::vector<std::int64_t>& key, const std::vector<VecX>& probs,
                int kv_head, int q_heads, int kv_heads, bool replace) {
  if (replace) std::fill(abar.begin(), abar.end(), 0.0);
  const int g = q_heads / kv_heads;
  for (int q = kv_head * g; q < (kv_head + 1) * g; ++q)
    for (std::size_t s = 0; s < key.size(); ++s)
      abar[static_cast<std::size_t>(key[s])] += probs[static_cast<std::size_t>(q)][static_cast<Eigen::Index>(s)] / g;
}

// A slot's value as a combination of original value rows, dense by age:
// entry o is the token o places before the slot's own (entry 0), with its
// coef_v and whether it is in the combination at all (absent entries hold
// +0). Dense, because the slots next to the eviction point receive each
// evicted slot's whole row, so their rows span long runs of tokens; merging
// sorted (token, coef) lists made the stream a sixth of CaM's prefill.
struct ValueRow {
  std::vector<double> coef;
  std::vector<unsigned char> present;
};

ValueRow own_row() { return {{1.0}, {1}}; }

// to[j] += coef * from[j] for every token j of `from`, where `to`'s slot holds
// the token `older` places after `from`'s. An absent entry of `to` holds +0 and
// an absent one of `from` adds coef * 0 = +0 to a coefficient >= +0: both are
// the sparse merge's value bit for bit (0 + coef * c_from, or c_to unchanged).
void add_scaled(ValueRow& to, std::int64_t older, const ValueRow& from, double coef) {
  const std::size_t shift = static_cast<std::size_t>(older), n = from.coef.size();
  if (to.coef.size() < n + shift) {
    to.coef.resize(n + shift, 0.0);
    to.present.resize(n + shift, 0);
  }
  // Raw pointers, one array per loop: a char store may alias anything, so
  // through the vectors every iteration would reload their data pointers.
  double* tc = to.coef.data() + shift;
  const double* fc = from.coef.data();
  for (std::size_t o = 0; o < n; ++o) tc[o] = tc[o] + coef * fc[o];
  unsigned char* tp = to.present.data() + shift;
  const unsigned char* fp = from.present.data();
  for (std::size_t o = 0; o < n; ++o) tp[o] |= fp[o];
}

// The prompt as a stream (the lm_eval simulation's per-position loop): token t
// arrives, one pass evicts for space (gate probabilities from `prob` over the
// current keys), then `attend(t, keys)` lets query t see the cached keys.
// Keys are evicted by position only; merges move values. `margin` (nullable)
// receives the smallest |u - p| of the Bernoulli draws.
using AttendFn = std::function<void(std::int64_t t, const std::vector<std::int64_t>& key)>;
using StreamProb = std::function<ProbFn(const std::vector<std::int64_t>& key)>;

Plan stream_head(std::int64_t T, std::int64_t budget, const Config& c, int layer, int h, const StreamProb& prob,
                 const AttendFn& attend, double* margin) {
  std::vector<std::int64_t> key;  // per slot: its key token
  std::vector<ValueRow> rows;     // per token: its slot's value (the token at coef_v 1 until it receives)
  const auto row = [&](std::int64_t slot) -> ValueRow& {
    return rows[static_cast<std::size_t>(key[static_cast<std::size_t>(slot)])];
  };
  for (std::int64_t t = 0; t < T; ++t) {
    key.push_back(t);
    rows.push_back(own_row());
    if (static_cast<std::int64_t>(key.size()) > budget) {
      const Pass pass = evict_pass(key, budget, 1, prob(key), c, layer, h, margin);
      for (const Merge& g : pass.merges)
        for (std::int64_t to : g.to)
          add_scaled(row(to), key[static_cast<std::size_t>(to)] - key[static_cast<std::size_t>(g.from)], row(g.from), g.coef);
      for (std::int64_t s = pass.first; s < pass.end; ++s) row(s) = ValueRow();  // the evicted rows' memory
      key.erase(key.begin() + pass.first, key.begin() + pass.end);
    }
    if (attend) attend(t, key);
  }
  Plan p;
  p.n = T;
  std::vector<std::int64_t> tok;
  std::vector<double> ck, cv;
  for (std::size_t s = 0; s < key.size(); ++s) {
    tok.clear(), ck.clear(), cv.clear();
    const ValueRow& r = rows[static_cast<std::size_t>(key[s])];
    for (std::size_t o = r.coef.size(); o-- > 0;) {  // oldest token first
      if (!r.present[o]) continue;
      tok.push_back(key[s] - static_cast<std::int64_t>(o));
      ck.push_back(o == 0 ? 1.0 : 0.0);
      cv.push_back(r.coef[o]);
    }
    p.add_row(tok, ck, cv, key[s], static_cast<std::int64_t>(tok.size()));
  }
  return p;
}

struct Simulation {
  std::vector<Plan> plans;                // per kv head, over the T prompt tokens
  std::vector<std::vector<double>> abar;  // per kv head, by token
  std::vector<double> margin;             // per kv head: smallest |u - p| (0 when a denominator underflows fp32)
};

Simulation simulate(const LayerInput& in, std::int64_t budget, const Config& c) {
  const std::int64_t T = in.tokens();
  const int H = static_cast<int>(in.k.size()), Q = static_cast<int>(in.q.size());
  Simulation sim;
  for (int h = 0; h < H; ++h) {
    const MatX& K = in.k[static_cast<std::size_t>(h)];
    std::vector<double> abar(static_cast<std::size_t>(T), 0.0);
    bool tiny = false;
    double margin = std::numeric_limits<double>::infinity();
    const StreamProb prob = [&](const std::vector<std::int64_t>& key) { return abar_prob(key, abar, c, &tiny); };
    const AttendFn attend = [&](std::int64_t t, const std::vector<std::int64_t>& key) {
      if (c.score == Score::kDecode) return;  // kvpress: Ā counts decoding steps only
      MatX Kc(static_cast<Eigen::Index>(key.size()), K.cols());
      for (std::size_t s = 0; s < key.size(); ++s) Kc.row(static_cast<Eigen::Index>(s)) = K.row(key[s]);
      std::vector<VecX> probs(static_cast<std::size_t>(Q));
      for (int q = 0; q < Q; ++q)
        if (kv_head_of(q, Q, H) == h)
          probs[static_cast<std::size_t>(q)] =
              softmax(Kc * in.q[static_cast<std::size_t>(q)].row(t).transpose() / std::sqrt(static_cast<double>(K.cols())));
      accumulate(abar, key, probs, h, Q, H, c.score == Score::kStep);
    };
    sim.plans.push_back(stream_head(T, budget, c, in.layer, h, prob, attend, &margin));
    sim.abar.push_back(std::move(abar));
    sim.margin.push_back(tiny ? 0.0 : margin);
  }
  return sim;
}

// Ā after a one-shot prefill: the full-cache prompt attention (group mean), or
// only the last prompt query's for the per-step score, or nothing (kvpress).
std::vector<double> prompt_abar(const LayerInput& in, int h, Score score) {
  const std::int64_t T = in.tokens();
  const int H = static_cast<int>(in.k.size()), Q = static_cast<int>(in.q.size());
  std::vector<double> abar(static_cast<std::size_t>(T), 0.0);
  if (score == Score::kDecode || T == 0) return abar;
  for (int q = 0; q < Q; ++q) {
    if (kv_head_of(q, Q, H) != h) continue;
    const MatX& K = in.k[static_cast<std::size_t>(h)];
    const VecX a = score == Score::kCumulative
                       ? accumulated_attention(in, q, false)
                       : VecX(softmax(K * in.q[static_cast<std::size_t>(q)].row(T - 1).transpose() /
                                      std::sqrt(static_cast<double>(K.cols()))));
    for (std::int64_t j = 0; j < T; ++j) abar[static_cast<std::size_t>(j)] += a[j] / (Q / H);
  }
  return abar;
}

class Decoder final : public DecodePolicy {
 public:
  Decoder(Config c, int layer, int q_heads, std::vector<std::int64_t> budgets, std::vector<std::vector<double>> abar)
      : c_(c), layer_(layer), q_heads_(q_heads), budgets_(std::move(budgets)), abar_(std::move(abar)) {}

  StepPlans before_attend(const DecodeStep& step) override {
    ++since_;
    StepPlans out(step.heads->size());
    bool fired = false;
    for (std::size_t h = 0; h < step.heads->size(); ++h) {
      const Plan& cur = (*step.heads)[h].plan;
      abar_[h].resize(static_cast<std::size_t>(cur.n), 0.0);
      if (cur.slots() <= budgets_[h] || since_ < c_.interval) continue;
      const std::vector<std::int64_t> key = key_tokens(cur);
      const Pass pass = evict_pass(key, budgets_[h], since_, abar_prob(key, abar_[h], c_), c_, layer_, static_cast<int>(h));
      out[h] = pass_plan(pass, cur);
      fired = true;
    }
    if (fired) since_ = 0;
    return out;
  }

  StepPlans after_attend(const DecodeStep& step, const std::vector<VecX>& probs) override {
    const auto H = static_cast<int>(step.heads->size());
    for (int h = 0; h < H; ++h)
      accumulate(abar_[static_cast<std::size_t>(h)], key_tokens((*step.heads)[static_cast<std::size_t>(h)].plan), probs,
                 h, q_heads_, H, c_.score == Score::kStep);
    return StepPlans(step.heads->size());
  }

 private:
  Config c_;
  int layer_, q_heads_;
  std::vector<std::int64_t> budgets_;
  std::vector<std::vector<double>> abar_;  // per kv head, by original token
  std::int64_t since_ = 0;                 // decode steps since the last pass
};

}  // namespace

CamConfig cam_config(const Params& p) {
  CamConfig c;
  c.sinks = p.integer("sinks", 0);
  c.window = p.text("window") == "recent" ? 0 : p.integer("window", 1);
  c.interval = p.integer("interval", 1);
  c.seed = static_cast<std::uint64_t>(p.integer("seed", 0));
  const std::string gate = p.choice("gate", {"bernoulli", "always", "never"});
  c.gate = gate == "always" ? Gate::kAlways : gate == "never" ? Gate::kNever : Gate::kBernoulli;
  c.denominator = p.choice("denominator", {"mean", "max"}) == "max" ? Denominator::kMax : Denominator::kMean;
  const std::string score = p.choice("attention", {"cumulative", "decode", "step"});
  c.score = score == "decode" ? Score::kDecode : score == "step" ? Score::kStep : Score::kCumulative;
  const std::string prefill = p.choice("prefill", {"simulate", "evict", "none"});
  c.prefill = prefill == "evict" ? Prefill::kEvict : prefill == "none" ? Prefill::kNone : Prefill::kSimulate;
  c.rescale = p.choice("truncated", {"drop", "rescale"}) == "rescale";
  return c;
}

void cam_check_budget(const CamConfig& c, std::int64_t budget) {
  // Every pass evicts down to the budget with the arriving token cached: B >= sinks + 1.
  if (budget < c.sinks + 1)
    throw Error(ErrorKind::kImpossibleBudget, "cam: budget " + std::to_string(budget) + " cannot hold sinks " +
                                                  std::to_string(c.sinks) + " + 1 slot for the arriving token");
}

CamStream cam_stream(const CamConfig& c, std::int64_t T, std::int64_t budget, int layer, int kv_head,
                     const std::vector<double>& p_by_token) {
  CamStream out;
  out.margin = std::numeric_limits<double>::infinity();
  const StreamProb prob = [&](const std::vector<std::int64_t>& key) -> ProbFn {
    return [&key, &p_by_token](std::int64_t e, const std::vector<std::int64_t>&, const Pass&) {
      return p_by_token[static_cast<std::size_t>(key[static_cast<std::size_t>(e)])];
    };
  };
  out.plan = stream_head(T, budget, c, layer, kv_head, prob, nullptr, &out.margin);
  return out;
}

namespace {

class CaM final : public Method {
 public:
  CaM(std::string preset, const Params& p) : preset_(std::move(preset)), params_(p.all()), c_(cam_config(p)) {}

  std::string name() const override { return method_name("cam", preset_, params_); }

  Laws laws() const override {
    return {c_.prefill == Prefill::kNone ? BudgetLaw::kNone : BudgetLaw::kExact,
            c_.interval == 1 ? BudgetLaw::kAtMost : BudgetLaw::kNone, ConservationLaw::kValueHandOff};
  }

  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    require(budget);
    const std::int64_t T = in.tokens();
    std::vector<Plan> plans;
    if (c_.prefill == Prefill::kSimulate) {
      plans = simulate(in, budget, c_).plans;
    } else {
      const Plan p = c_.prefill == Prefill::kNone ? Plan::identity(T) : Plan::keep(T, streaming_kept(T, c_.sinks, budget - c_.sinks));
      plans.assign(in.k.size(), p);
    }
    return LayerPlans::uniform(std::move(plans), budget);
  }

  std::unique_ptr<DecodePolicy> decoder(const LayerInput& in, const std::vector<std::int64_t>& budgets) const override {
    if (budgets.empty()) return nullptr;
    require(budgets.front());
    std::vector<std::vector<double>> abar;
    if (c_.prefill == Prefill::kSimulate) {
      abar = simulate(in, budgets.front(), c_).abar;  // deterministic: the same Ā the prefill plan saw
    } else {
      for (int h = 0; h < static_cast<int>(in.k.size()); ++h) abar.push_back(prompt_abar(in, h, c_.score));
    }
    return std::make_unique<Decoder>(c_, in.layer, static_cast<int>(in.q.size()), budgets, std::move(abar));
  }

  // Kept tokens are no threshold on one score: 1 (kept) / -1 (evicted), and
  // head_margin = the head's smallest gate margin |u - p| (as ems.cpp;
  // docs/verification.md, "Merge plans"). Only the simulated prefill draws.
  std::optional<LayerScores> decision_scores(const LayerInput& in, const LayerPlans& plans,
                                             std::int64_t budget) const override {
    if (c_.prefill != Prefill::kSimulate) return std::nullopt;  // position-only: must match exactly
    const Simulation sim = simulate(in, budget, c_);
    LayerScores out;
    out.protected_tokens = protected_tokens(in.tokens(), budget);
    for (std::size_t h = 0; h < plans.plans.size(); ++h) {
      VecX s = VecX::Constant(in.tokens(), -1.0);
      for (std::int64_t t : plans.plans[h].token) s[t] = 1.0;
      out.per_kv_head.push_back(std::move(s));
      out.head_margin.push_back(sim.margin[h]);
    }
    return out;
  }

  // Only the sinks stay alone and unchanged: recent slots receive merged values.
  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t budget) const override {
    require(budget);
    return index_range(0, std::min(c_.sinks, n));
  }

 private:
  void require(std::int64_t budget) const { cam_check_budget(c_, budget); }

  std::string preset_;
  std::map<std::string, std::string> params_;
  Config c_;
};

}  // namespace

FamilyInfo cam_family() {
  FamilyInfo f;
  f.family = "cam";
  f.kind = "merge";
  f.when = "prefill + decode";
  f.summary = "StreamingLLM eviction that hands each evicted value to the next m kept tokens, gated by a seeded "
              "Bernoulli draw with p = clamp(A_i / denom, 0, 1); keys untouched.";
  f.params = {
      {"sinks", "4", "first tokens never evicted: integer >= 0"},
      {"window", "16", "merge window m (next m kept tokens): integer >= 1, or recent = budget - sinks"},
      {"gate", "bernoulli", "bernoulli: M ~ Bernoulli(p) from the seeded stream; always: M = 1; never: M = 0 (plain eviction)"},
      {"seed", "0", "seed of the draw stream, u = SplitMix64(seed, layer, kv head, token): integer >= 0"},
      {"denominator", "mean", "mean: mean of A over the window (paper Eq., kvpress, streaming code); max: max of A over "
                              "the cache (lm_eval simulation)"},
      {"attention", "cumulative", "A: cumulative (prompt + decode), decode (decode steps only, kvpress), step (the latest "
                                  "query only, utils_hh)"},
      {"truncated", "drop", "window cut by the cache end: drop (divide by m, paper code) or rescale (divide by its size, kvpress)"},
      {"prefill", "simulate", "simulate: stream the prompt through the same rule; evict: StreamingLLM without merging; "
                              "none: keep the prompt, compress while decoding"},
      {"interval", "1", "decode steps between eviction passes: 1 = every step (paper); N = bulk pass (kvpress)"},
  };
  f.presets = {
      {"paper",
       {{"sinks", "4"}, {"window", "16"}, {"denominator", "mean"}, {"attention", "cumulative"}, {"truncated", "drop"},
        {"prefill", "simulate"}, {"interval", "1"}},
       "Zhang et al. ICML 2024 Algorithm 1 as in the authors' streaming code (generate_task/streaming_llm/"
       "kv_cache_cam.py): start 4 + recent, merge into the first 16 recent tokens, cumulative A, window mean"},
      {"lm-eval",
       {{"sinks", "4"}, {"window", "recent"}, {"denominator", "max"}, {"attention", "cumulative"}, {"truncated", "drop"},
        {"prefill", "simulate"}, {"interval", "1"}},
       "the authors' simulation (cam_hf/utils_lm_eval/modify_llama_cam.py): m = recent band, denominator max over "
       "start + recent (start fixed at 4 here, the code uses 10% of the length)"},
      {"kvpress",
       {{"sinks", "4"}, {"window", "32"}, {"denominator", "mean"}, {"attention", "decode"}, {"truncated", "rescale"},
        {"prefill", "none"}, {"interval", "512"}},
       "NVIDIA kvpress CAMPress (presses/cam_press.py, PR #196/#221) over StreamingLLMPress: bulk pass every 512 "
       "steps, merge_budget 32, A from decoding only, actual_budget rescaling"},
  };
  f.make = [](const std::string& preset, const Params& p) { return std::make_unique<CaM>(preset, p); };
  return f;
}

}  // namespace kvscope::ref
