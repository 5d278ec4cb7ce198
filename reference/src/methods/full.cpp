#include "kvscope/reference/methods/full.hpp"

#include <numeric>

namespace kvscope::ref {
namespace {

class Full final : public Method {
 public:
  std::string name() const override { return "full"; }
  Laws laws() const override { return {BudgetLaw::kNone, BudgetLaw::kNone, ConservationLaw::kEviction}; }
  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    return LayerPlans::uniform(std::vector<Plan>(in.k.size(), Plan::identity(in.tokens())), budget);
  }
  std::unique_ptr<DecodePolicy> decoder(const LayerInput&, const std::vector<std::int64_t>&) const override {
    return nullptr;
  }
  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t) const override {
    std::vector<std::int64_t> all(static_cast<std::size_t>(n));
    std::iota(all.begin(), all.end(), 0);
    return all;
  }
};

}  // namespace

FamilyInfo full_family() {
  FamilyInfo f;
  f.family = "full";
  f.kind = "none";
  f.when = "-";
  f.summary = "The uncompressed cache; ignores the budget. Its error is zero by construction.";
  f.make = [](const std::string&, const Params&) { return std::make_unique<Full>(); };
  return f;
}

}  // namespace kvscope::ref
