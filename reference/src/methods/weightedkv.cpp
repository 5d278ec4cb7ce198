#include "kvscope/reference/methods/weightedkv.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/scorer.hpp"

namespace kvscope::ref {

void WeightedKVConfig::check_budget(std::int64_t budget) const {
  // Compressing needs a candidate outside the sinks and the recent band, and a
  // second non-sink slot to take its value.
  const std::int64_t need = sinks + std::max<std::int64_t>(recent, 1);
  if (budget < need)
    throw Error(ErrorKind::kImpossibleBudget, "weightedkv: budget " + std::to_string(budget) + " cannot hold sinks " +
                                                  std::to_string(sinks) + " + recent " + std::to_string(recent) +
                                                  " and still merge (needs >= " + std::to_string(need) + ")");
}

void weightedkv_compress(std::vector<WeightedSlot>& slots, std::int64_t budget, const WeightedKVConfig& c,
                         std::vector<WeightedMerge>* log, double* min_margin) {
  while (static_cast<std::int64_t>(slots.size()) > budget) {
    const auto size = static_cast<std::int64_t>(slots.size());
    const auto sink = [&](std::int64_t i) { return slots[static_cast<std::size_t>(i)].token < c.sinks; };
    // Victim: lowest average attention outside the sinks and the recent band;
    // slots are in position order, so the strict < keeps the oldest on ties.
    std::int64_t e = -1;
    double lowest = 0;  // slots[e].average(), divided once
    for (std::int64_t i = 0; i < size - c.recent; ++i) {
      if (sink(i)) continue;
      const double a = slots[static_cast<std::size_t>(i)].average();
      if (e < 0 || a < lowest) e = i, lowest = a;
    }
    if (e < 0) throw Error(ErrorKind::kInternal, "weightedkv: no slot may be merged (budget check missed a case)");
    if (min_margin) {  // the victim against the runner-up
      double second = std::numeric_limits<double>::infinity(), scale = 0;
      for (std::int64_t i = 0; i < size - c.recent; ++i) {
        if (sink(i)) continue;
        const double a = slots[static_cast<std::size_t>(i)].average();
        scale = std::max(scale, std::abs(a));
        if (i != e) second = std::min(second, a);
      }
      const double gap = second - slots[static_cast<std::size_t>(e)].average();
      if (std::isfinite(gap)) *min_margin = std::min(*min_margin, gap <= 1e-30 || !(scale > 0) ? 0.0 : gap / scale);
    }
    // Neighbour in the configured direction; the other side when that one is missing or a sink.
    const auto usable = [&](std::int64_t i) { return i >= 0 && i < size && !sink(i); };
    std::int64_t m = c.merge_next ? e + 1 : e - 1;
    if (!usable(m)) m = c.merge_next ? e - 1 : e + 1;
    if (!usable(m)) throw Error(ErrorKind::kInternal, "weightedkv: slot has no neighbour to merge into");
    WeightedSlot& victim = slots[static_cast<std::size_t>(e)];
    WeightedSlot& into = slots[static_cast<std::size_t>(m)];
    const double ae = victim.average(), am = into.average();
    const double lambda = ae + am > 0 ? ae / (ae + am) : 0.5;  // guard: no attention on either -> plain average
    if (min_margin && ae + am <= 1e-30) *min_margin = 0.0;
    std::vector<std::pair<std::int64_t, double>> v;
    v.reserve(into.value.size() + victim.value.size());
    for (const auto& [i, w] : into.value) v.emplace_back(i, (1 - lambda) * w);
    for (const auto& [i, w] : victim.value) v.emplace_back(i, lambda * w);
    std::sort(v.begin(), v.end());
    into.value = std::move(v);
    into.count += victim.count;
    if (c.add_score) into.S += victim.S;
    if (log) log->push_back({victim.token, into.token, lambda});
    slots.erase(slots.begin() + e);
  }
}

Plan weightedkv_plan(const std::vector<WeightedSlot>& slots, std::int64_t inputs) {
  Plan p;
  p.n = inputs;
  std::vector<std::int64_t> tok;
  std::vector<double> ck, cv;
  for (const WeightedSlot& s : slots) {
    tok.clear();
    ck.clear();
    cv.clear();
    for (const auto& [i, w] : s.value) {
      tok.push_back(i);
      ck.push_back(i == s.key ? 1.0 : 0.0);
      cv.push_back(w);
    }
    if (s.value.size() == 1 && s.value.front().second == 1.0)
      p.add_kept(s.key);
    else
      p.add_row(tok, ck, cv, s.position, s.count);
  }
  return p;
}

namespace {

double reduce_group(const std::vector<double>& v, Reduce r) {
  double s = 0, m = v.front();
  for (double x : v) s += x, m = std::max(m, x);
  return r == Reduce::kMax ? m : r == Reduce::kSum ? s : s / static_cast<double>(v.size());
}

WeightedSlot fresh_slot(std::int64_t input, std::int64_t token, std::int64_t position, std::int64_t count) {
  WeightedSlot s;
  s.key = input;
  s.token = token;
  s.value = {{input, 1.0}};
  s.position = position;
  s.count = count;
  return s;
}

}  // namespace

std::vector<WeightedSlot> weightedkv_stream(std::int64_t tokens, std::int64_t budget, const WeightedKVConfig& c,
                                            const WeightedAttend& attend, double* min_margin) {
  std::vector<WeightedSlot> slots;
  std::vector<double> a;
  for (std::int64_t i = 0; i < tokens; ++i) {
    slots.push_back(fresh_slot(i, i, i, 1));
    attend(i, slots, a);
    for (std::size_t s = 0; s < slots.size(); ++s) {
      slots[s].S += a[s];
      slots[s].n += 1;
    }
    weightedkv_compress(slots, budget, c, nullptr, min_margin);
  }
  return slots;
}

std::vector<WeightedSlot> weightedkv_oneshot(const VecX& sums, std::int64_t budget, const WeightedKVConfig& c,
                                             double* min_margin) {
  const std::int64_t T = sums.size();
  std::vector<WeightedSlot> slots;
  for (std::int64_t j = 0; j < T; ++j) {
    slots.push_back(fresh_slot(j, j, j, 1));
    slots.back().S = sums[j];
    slots.back().n = static_cast<double>(T - j);
  }
  weightedkv_compress(slots, budget, c, nullptr, min_margin);
  return slots;
}

std::vector<WeightedSlot> weightedkv_prefill_slots(const LayerInput& in, int kv, std::int64_t budget,
                                                   const WeightedKVConfig& c, double* min_margin) {
  const std::int64_t T = in.tokens();
  const int q_heads = static_cast<int>(in.q.size()), kv_heads = static_cast<int>(in.k.size());
  const int g = q_heads / kv_heads;
  const MatX& K = in.k[static_cast<std::size_t>(kv)];
  if (!c.streaming_prefill) {
    // One shot: the prompt's accumulated attention, averaged over the T - j
    // queries that saw token j, then the same drop-and-merge loop.
    std::vector<VecX> acc;
    for (int h = 0; h < q_heads; ++h) acc.push_back(accumulated_attention(in, h, false));
    return weightedkv_oneshot(group_reduce(acc, kv, q_heads, kv_heads, c.gqa), budget, c, min_margin);
  }
  // Streaming: prompt token i joins the cache, its query (every q head of the
  // group) attends over the cache's keys (original keys: never modified), the
  // scores update, then the cache is compressed back to the budget.
  const double scale = 1.0 / std::sqrt(static_cast<double>(K.cols()));
  std::vector<double> group(static_cast<std::size_t>(g));
  std::vector<VecX> probs(static_cast<std::size_t>(g));
  const auto attend = [&](std::int64_t i, const std::vector<WeightedSlot>& slots, std::vector<double>& out) {
    const auto m = static_cast<Eigen::Index>(slots.size());
    for (int q = 0; q < g; ++q) {
      const auto qrow = in.q[static_cast<std::size_t>(kv * g + q)].row(i);
      VecX logits(m);
      for (Eigen::Index s = 0; s < m; ++s) logits[s] = scale * qrow.dot(K.row(slots[static_cast<std::size_t>(s)].key));
      probs[static_cast<std::size_t>(q)] = softmax(logits);
    }
    out.resize(static_cast<std::size_t>(m));
    for (Eigen::Index s = 0; s < m; ++s) {
      for (int q = 0; q < g; ++q) group[static_cast<std::size_t>(q)] = probs[static_cast<std::size_t>(q)][s];
      out[static_cast<std::size_t>(s)] = reduce_group(group, c.gqa);
    }
  };
  return weightedkv_stream(T, budget, c, attend, min_margin);
}

WeightedKVDecoder::WeightedKVDecoder(const LayerInput& in, std::vector<std::int64_t> head_budgets,
                                     const WeightedKVConfig& c)
    : budgets_(std::move(head_budgets)),
      c_(c),
      q_heads_(static_cast<int>(in.q.size())),
      kv_heads_(static_cast<int>(in.k.size())),
      S_(budgets_.size()),
      n_(budgets_.size()),
      merges_(budgets_.size()) {
  // Recover the state prefill left (deterministic: the same loop again).
  const auto T = static_cast<std::size_t>(in.tokens());
  for (std::size_t kv = 0; kv < budgets_.size(); ++kv) {
    S_[kv].assign(T, 0.0);
    n_[kv].assign(T, 0.0);
    for (const WeightedSlot& s : weightedkv_prefill_slots(in, static_cast<int>(kv), budgets_[kv], c_)) {
      S_[kv][static_cast<std::size_t>(s.token)] = s.S;
      n_[kv][static_cast<std::size_t>(s.token)] = s.n;
    }
  }
}

StepPlans WeightedKVDecoder::before_attend(const DecodeStep& step) { return StepPlans(step.heads->size()); }

StepPlans WeightedKVDecoder::after_attend(const DecodeStep& step, const std::vector<VecX>& probs) {
  const auto& heads = *step.heads;
  const auto n = static_cast<std::size_t>(step.token + 1);
  const int g = q_heads_ / kv_heads_;
  StepPlans out(heads.size());
  std::vector<double> group(static_cast<std::size_t>(g));
  for (std::size_t kv = 0; kv < heads.size(); ++kv) {
    merges_[kv].clear();
    const Plan& p = heads[kv].plan;
    const std::int64_t m = p.slots();
    if (S_[kv].size() < n) {
      S_[kv].resize(n, 0.0);
      n_[kv].resize(n, 0.0);
    }
    std::vector<WeightedSlot> slots;
    for (std::int64_t i = 0; i < m; ++i) {
      std::int64_t key = -1;
      for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e)
        if (p.coef_k[static_cast<std::size_t>(e)] != 0.0) key = p.token[static_cast<std::size_t>(e)];
      for (int q = 0; q < g; ++q) {
        const VecX& pr = probs[kv * static_cast<std::size_t>(g) + static_cast<std::size_t>(q)];
        if (pr.size() != m)
          throw Error(ErrorKind::kInternal, "weightedkv: kv head " + std::to_string(kv) + " got " +
                                                std::to_string(pr.size()) + " probabilities for " + std::to_string(m) +
                                                " slots");
        group[static_cast<std::size_t>(q)] = pr[i];
      }
      const auto k = static_cast<std::size_t>(key);
      S_[kv][k] += reduce_group(group, c_.gqa);
      n_[kv][k] += 1;
      slots.push_back(fresh_slot(i, key, p.position[static_cast<std::size_t>(i)], p.count[static_cast<std::size_t>(i)]));
      slots.back().S = S_[kv][k];
      slots.back().n = n_[kv][k];
    }
    if (m <= budgets_[kv]) continue;
    // Compress after attending: the query saw B + 1 slots, the cache keeps B.
    weightedkv_compress(slots, budgets_[kv], c_, &merges_[kv]);
    for (const WeightedSlot& s : slots) S_[kv][static_cast<std::size_t>(s.token)] = s.S;
    out[kv] = weightedkv_plan(slots, m);
  }
  return out;
}

std::pair<double, double> WeightedKVDecoder::state(int kv, std::int64_t token) const {
  const auto& S = S_[static_cast<std::size_t>(kv)];
  const auto& n = n_[static_cast<std::size_t>(kv)];
  const auto t = static_cast<std::size_t>(token);
  return t < S.size() ? std::make_pair(S[t], n[t]) : std::make_pair(0.0, 0.0);
}

WeightedKVConfig weightedkv_config(const Params& p) {
  WeightedKVConfig c;
  c.merge_next = p.choice("neighbour", {"next", "previous"}) == "next";
  c.add_score = p.choice("score_update", {"keep", "add"}) == "add";
  c.sinks = p.integer("sinks", 0);
  c.recent = p.integer("recent", 0);
  c.gqa = parse_reduce(p.text("gqa"), "weightedkv: gqa");
  c.streaming_prefill = p.choice("prefill", {"streaming", "oneshot"}) == "streaming";
  return c;
}

namespace {

class WeightedKV final : public Method {
 public:
  WeightedKV(std::string preset, const Params& p) : preset_(std::move(preset)), params_(p.all()), c_(weightedkv_config(p)) {}

  std::string name() const override { return method_name("weightedkv", preset_, params_); }
  // min(B, n) slots after prefill and after every decode step; keys one-hot,
  // value rows convex.
  Laws laws() const override { return {BudgetLaw::kExact, BudgetLaw::kExact, ConservationLaw::kRowConvex}; }

  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    c_.check_budget(budget);
    std::vector<Plan> plans;
    for (int kv = 0; kv < static_cast<int>(in.k.size()); ++kv)
      plans.push_back(weightedkv_plan(weightedkv_prefill_slots(in, kv, budget, c_), in.tokens()));
    return LayerPlans::uniform(std::move(plans), budget);
  }

  // Per kv head, the smallest margin of the victim choices prefill made
  // (scores: zeros, every token stays in some slot's value row).
  std::optional<LayerScores> decision_scores(const LayerInput& in, const LayerPlans&,
                                             std::int64_t budget) const override {
    c_.check_budget(budget);
    LayerScores out;
    out.reweights_follow_decisions = true;  // merge order sets the products of lambdas
    for (int kv = 0; kv < static_cast<int>(in.k.size()); ++kv) {
      double margin = std::numeric_limits<double>::infinity();
      weightedkv_prefill_slots(in, kv, budget, c_, &margin);
      out.per_kv_head.push_back(VecX::Zero(in.tokens()));
      out.head_margin.push_back(margin);
    }
    return out;
  }

  std::unique_ptr<DecodePolicy> decoder(const LayerInput& in, const std::vector<std::int64_t>& budgets) const override {
    for (std::int64_t b : budgets) c_.check_budget(b);
    return std::make_unique<WeightedKVDecoder>(in, budgets, c_);
  }

  // Sinks are never dropped nor merged into. The recent band is never dropped
  // but may receive a merged value (neighbour=next), so it is not "unchanged".
  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t budget) const override {
    c_.check_budget(budget);
    return index_range(0, std::min(c_.sinks, n));
  }

 private:
  std::string preset_;
  std::map<std::string, std::string> params_;
  WeightedKVConfig c_;
};

}  // namespace

FamilyInfo weightedkv_family() {
  FamilyInfo f;
  f.family = "weightedkv";
  f.kind = "merge values";
  f.when = "prefill + decode";
  f.summary = "Drop the key of the lowest average-attention slot and merge its value into a neighbour's, weighted "
              "by the two averages; keys never modified; |cache| = B every step.";
  f.params = {
      {"neighbour", "next", "slot that takes the dropped value: next or previous (the other side when missing "
                            "or a sink)"},
      {"score_update", "keep", "on merge: keep the surviving slot's attention sum, or add the dropped slot's sum"},
      {"sinks", "0", "first tokens never dropped nor merged into (integer >= 0)"},
      {"recent", "1", "newest slots never dropped (integer >= 0)"},
      {"gqa", "mean", "a step's attention of a group's q heads reduced to the kv head: mean, max or sum"},
      {"prefill", "streaming",
       "streaming: the prompt token by token, each prompt query attending over the compressed cache (the "
       "paper's fixed-size generation setting); oneshot: the prompt's accumulated attention averaged over the "
       "queries that saw each token, then the same loop"},
  };
  f.presets = {
      {"paper",
       {{"neighbour", "next"}, {"score_update", "keep"}, {"sinks", "0"}, {"recent", "1"}, {"gqa", "mean"},
        {"prefill", "streaming"}},
       "arXiv 2503.01330 abstract + research notes 4.4 reconstruction: merge into the next token, averages kept, "
       "no sinks, the newest token protected, streaming from the first token"},
      {"sinks",
       {{"neighbour", "next"}, {"score_update", "keep"}, {"sinks", "4"}, {"recent", "8"}, {"gqa", "mean"},
        {"prefill", "streaming"}},
       "the paper's loop with StreamingLLM-style protection (4 sinks, 8 recent), as its baselines"},
      {"oneshot",
       {{"neighbour", "next"}, {"score_update", "keep"}, {"sinks", "0"}, {"recent", "1"}, {"gqa", "mean"},
        {"prefill", "oneshot"}},
       "full-attention prefill compressed once with the accumulated attention (prefill/attn_colsum), then the "
       "paper's decode loop"},
      {"mass",
       {{"neighbour", "next"}, {"score_update", "add"}, {"sinks", "0"}, {"recent", "1"}, {"gqa", "mean"},
        {"prefill", "streaming"}},
       "mass-tracking variant (research notes 4.4 option): the surviving slot adds the dropped slot's sum"},
  };
  f.make = [](const std::string& preset, const Params& p) { return std::make_unique<WeightedKV>(preset, p); };
  return f;
}

}  // namespace kvscope::ref
