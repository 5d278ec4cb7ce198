#include "kvscope/reference/methods/streaming_llm.hpp"

#include <algorithm>

#include "kvscope/core/error.hpp"

namespace kvscope::ref {

std::vector<std::int64_t> streaming_kept(std::int64_t n, std::int64_t sinks, std::int64_t recent) {
  std::vector<std::int64_t> kept;
  const std::int64_t s = std::min(sinks, n);
  for (std::int64_t j = 0; j < s; ++j) kept.push_back(j);
  for (std::int64_t j = std::max(s, n - recent); j < n; ++j) kept.push_back(j);
  return kept;
}

namespace {

// A kept subset of the current slots, in slot order, as a plan over slots.
Plan keep_slots(std::int64_t slots, const std::vector<std::int64_t>& kept, PositionMode mode) {
  Plan p;
  p.n = slots;
  p.positions = mode;
  for (std::int64_t j : kept) p.add_kept(j);
  return p;
}

struct Split {
  std::int64_t sinks, recent;
};

class StreamingLLM final : public Method {
 public:
  StreamingLLM(std::string preset, const Params& p) : preset_(std::move(preset)), params_(p.all()) {
    sinks_auto_ = p.text("sinks") == "auto";
    recent_auto_ = p.text("recent") == "auto";
    if (sinks_auto_ && recent_auto_) throw Error(ErrorKind::kUsage, "streaming_llm: 'sinks' and 'recent' cannot both be auto");
    sinks_ = sinks_auto_ ? 0 : p.integer("sinks", 0);
    recent_ = recent_auto_ ? 0 : p.integer("recent", 0);
    mode_ = p.choice("positions", {"original", "rerotated"}) == "rerotated" ? PositionMode::kRerotated
                                                                           : PositionMode::kOriginal;
    evict_in_decode_ = p.choice("decode", {"evict", "grow"}) == "evict";
  }

  std::string name() const override { return method_name("streaming_llm", preset_, params_); }
  Laws laws() const override {
    // With both sizes fixed the cache may stay below the budget (sinks + recent < B).
    const BudgetLaw fill = sinks_auto_ || recent_auto_ ? BudgetLaw::kExact : BudgetLaw::kAtMost;
    return {fill, evict_in_decode_ ? BudgetLaw::kAtMost : BudgetLaw::kNone, ConservationLaw::kEviction};
  }

  // The budget split into sinks and recent; the auto part takes the rest.
  Split split(std::int64_t budget) const {
    Split s{sinks_auto_ ? budget - recent_ : sinks_, recent_auto_ ? budget - sinks_ : recent_};
    if (s.sinks < 0 || s.recent < 0 || s.sinks + s.recent > budget)
      throw Error(ErrorKind::kImpossibleBudget,
                  "streaming_llm: budget " + std::to_string(budget) + " cannot hold sinks " +
                      (sinks_auto_ ? "auto" : std::to_string(sinks_)) + " + recent " +
                      (recent_auto_ ? "auto" : std::to_string(recent_)));
    if (evict_in_decode_ && s.recent < 1)
      throw Error(ErrorKind::kImpossibleBudget,
                  "streaming_llm: budget " + std::to_string(budget) + " leaves no recent slot for the decoded token (sinks " +
                      std::to_string(s.sinks) + "); raise the budget or lower 'sinks'");
    return s;
  }

  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    const Split s = split(budget);
    const std::int64_t n = in.tokens();
    Plan p = keep_slots(n, streaming_kept(n, s.sinks, s.recent), mode_);
    return LayerPlans::uniform(std::vector<Plan>(in.k.size(), p), budget);
  }

  std::unique_ptr<DecodePolicy> decoder(const LayerInput&, const std::vector<std::int64_t>& budgets) const override {
    if (!evict_in_decode_ || budgets.empty()) return nullptr;
    return std::make_unique<Decoder>(split(budgets.front()), mode_);  // uniform: every head the same
  }

  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t budget) const override {
    const Split s = split(budget);
    return streaming_kept(n, s.sinks, s.recent);
  }

 private:
  // Paper order: evict for space before the new token's query attends
  // (evict_for_space in the authors' code), so the query sees at most `budget` slots.
  class Decoder final : public DecodePolicy {
   public:
    Decoder(Split s, PositionMode mode) : s_(s), mode_(mode) {}
    StepPlans before_attend(const DecodeStep& step) override {
      StepPlans out;
      for (const HeadCache& h : *step.heads) {
        const std::int64_t m = h.plan.slots();
        if (m <= s_.sinks + s_.recent) {
          out.emplace_back();
        } else {
          out.emplace_back(keep_slots(m, streaming_kept(m, s_.sinks, s_.recent), mode_));
        }
      }
      return out;
    }
    StepPlans after_attend(const DecodeStep& step, const std::vector<VecX>&) override {
      return StepPlans(step.heads->size());
    }

   private:
    Split s_;
    PositionMode mode_;
  };

  std::string preset_;
  std::map<std::string, std::string> params_;
  bool sinks_auto_ = false, recent_auto_ = false;
  std::int64_t sinks_ = 0, recent_ = 0;
  PositionMode mode_ = PositionMode::kOriginal;
  bool evict_in_decode_ = true;
};

}  // namespace

FamilyInfo streaming_llm_family() {
  FamilyInfo f;
  f.family = "streaming_llm";
  f.kind = "evict";
  f.when = "prefill + decode";
  f.summary = "Keep `sinks` first tokens and the most recent ones; evict the middle (content-independent).";
  f.params = {
      {"sinks", "4", "attention-sink tokens kept at the start: integer >= 0, or auto = budget - recent"},
      {"recent", "auto", "most recent tokens kept: integer >= 0, or auto = budget - sinks"},
      {"positions", "rerotated",
       "original: keys keep their original RoPE positions; rerotated: keys (and the query) are re-rotated to "
       "their index in the cache, as the paper"},
      {"decode", "evict", "evict: keep <= budget slots while decoding (evict before attending); grow: compress "
                          "the prompt only, decoded tokens are all kept"},
  };
  f.presets = {
      {"paper", {{"sinks", "4"}, {"recent", "auto"}, {"positions", "rerotated"}, {"decode", "evict"}},
       "Xiao et al. 2024 and the authors' pos_shift code: 4 sinks, cache positions, evict for space each step"},
      {"kvpress", {{"sinks", "4"}, {"recent", "auto"}, {"positions", "original"}, {"decode", "grow"}},
       "NVIDIA kvpress StreamingLLMPress (n_sink=4): prompt only, original positions (no KeyRerotationPress)"},
      {"kvcache-factory", {{"sinks", "auto"}, {"recent", "32"}, {"positions", "original"}, {"decode", "grow"}},
       "KVCache-Factory StreamingLLMKVCluster: the whole prefix budget - window (window 32) plus the window"},
  };
  f.make = [](const std::string& preset, const Params& p) { return std::make_unique<StreamingLLM>(preset, p); };
  return f;
}

}  // namespace kvscope::ref
