#include "kvscope/reference/methods/pyramidkv.hpp"

#include <algorithm>
#include <cmath>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/snapkv.hpp"

namespace kvscope::ref {
namespace {

// Python's `//` (floor division); the authors' schedule is all-integer Python.
std::int64_t floordiv(std::int64_t a, std::int64_t b) {
  const std::int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// Python 3 round(): half to even.
double round_half_even(double x) {
  const double r = std::round(x);
  return std::abs(x - std::trunc(x)) == 0.5 ? 2.0 * std::round(x / 2.0) : r;
}

std::vector<std::int64_t> integer_schedule(int N, std::int64_t T, std::int64_t C, std::int64_t w, std::int64_t beta) {
  const auto n = static_cast<std::size_t>(N);
  if (T < C) return std::vector<std::int64_t>(n, T);           // no compression
  if (C < w || N == 1) return std::vector<std::int64_t>(n, C);  // reconstructed (see header)
  // KVCache-Factory pyramidkv_utils.py PyramidKVCluster.update_kv.
  std::int64_t min_num = floordiv(C - w, beta);
  std::int64_t max_num = (C - w) * 2 - min_num;
  if (max_num >= T - w) {
    max_num = T - w;
    min_num = (C - w) * 2 - max_num;
  }
  if (T < (C - w) * 2) return std::vector<std::int64_t>(n, C);  // uniform SnapKV (KVCF #6, #17)
  const std::int64_t steps = floordiv(max_num - min_num, N - 1);
  std::vector<std::int64_t> out(n);
  for (int l = 0; l < N; ++l) out[static_cast<std::size_t>(l)] = max_num - l * steps + w;
  return out;
}

}  // namespace

std::vector<double> pyramid_budgets_float_raw(int layers, std::int64_t T, double target, std::int64_t window,
                                              double beta) {
  const auto n = static_cast<std::size_t>(layers);
  const double w = static_cast<double>(window), L = static_cast<double>(T);
  // kvpress pyramidkv_press.py PyramidKVPress.get_layer_budget, operation for operation.
  const double mcp = w + target;
  double min_num = (mcp - w) / beta;
  double max_num = (mcp - w) * 2 - min_num;
  if (max_num >= L - w) {
    max_num = L - w;
    min_num = (mcp - w) * 2 - max_num;
  }
  if (!(L >= max_num && max_num >= min_num && min_num >= w) || layers == 1)
    return std::vector<double>(n, target);  // "Fall back to SnapKV"; N = 1 reconstructed
  const double steps = (max_num - min_num) / static_cast<double>(layers - 1);
  std::vector<double> out(n);
  for (int l = 0; l < layers; ++l) out[static_cast<std::size_t>(l)] = max_num - l * steps;
  return out;
}

std::vector<std::int64_t> pyramid_budgets_float(int layers, std::int64_t T, double target, std::int64_t window,
                                                double beta) {
  std::vector<std::int64_t> out;
  for (double b : pyramid_budgets_float_raw(layers, T, target, window, beta))
    out.push_back(std::min(T, static_cast<std::int64_t>(round_half_even(b))));
  return out;
}

std::vector<std::int64_t> pyramid_budgets(int layers, std::int64_t T, std::int64_t budget, std::int64_t window,
                                          std::int64_t beta, PyramidSchedule schedule) {
  if (layers < 1 || beta < 1 || budget < 0 || window < 0)
    throw Error(ErrorKind::kUsage, "pyramidkv: schedule needs layers >= 1, beta >= 1, budget >= 0, window >= 0");
  if (schedule == PyramidSchedule::kFloat)
    return pyramid_budgets_float(layers, T, static_cast<double>(budget), window, static_cast<double>(beta));
  return integer_schedule(layers, T, budget, window, beta);
}

namespace {

class PyramidKV final : public Method {
 public:
  PyramidKV(std::string preset, const Params& p)
      : preset_(std::move(preset)), params_(p.all()), c_(snapkv_config(p, "pyramidkv")) {
    beta_ = p.integer("beta", 1);
    schedule_ = p.choice("schedule", {"integer", "float"}) == "integer" ? PyramidSchedule::kInteger
                                                                        : PyramidSchedule::kFloat;
  }

  std::string name() const override { return method_name("pyramidkv", preset_, params_); }
  Laws laws() const override {
    return {BudgetLaw::kExact, BudgetLaw::kNone, ConservationLaw::kEviction, AllocationLaw::kPerLayer};
  }

  LayerPlans prefill(const LayerInput& in, std::int64_t budget) const override {
    if (!in.meta || in.layer < 0 || in.layer >= in.meta->layers)
      throw Error(ErrorKind::kInternal, "pyramidkv: layer " + std::to_string(in.layer) + " outside the trace's layers");
    const std::int64_t T = in.tokens();
    const std::int64_t b =
        pyramid_budgets(in.meta->layers, T, budget, c_.window, beta_, schedule_)[static_cast<std::size_t>(in.layer)];
    const LayerScores s = snapkv_scores(in, b, c_, "pyramidkv");
    const std::vector<std::int64_t> budgets(in.k.size(), b);
    return LayerPlans::uniform(select_per_head(s, T, budgets, name()), b);
  }

  std::optional<LayerScores> decision_scores(const LayerInput& in, const LayerPlans& plans,
                                             std::int64_t) const override {
    return snapkv_scores(in, plans.head_budgets.front(), c_, "pyramidkv");
  }

  std::unique_ptr<DecodePolicy> decoder(const LayerInput&, const std::vector<std::int64_t>&) const override {
    return nullptr;
  }

  // `budget` is the layer's own (the engine passes each head's declared budget).
  std::vector<std::int64_t> protected_tokens(std::int64_t n, std::int64_t budget) const override {
    return snapkv_protected(n, budget, c_, "pyramidkv");
  }

  // No scorer for AdaKV: the pyramid is a per-layer budget, which AdaKV's
  // head-shared allocation of one nominal budget cannot carry.

 private:
  std::string preset_;
  std::map<std::string, std::string> params_;
  SnapKVConfig c_;
  std::int64_t beta_ = 20;
  PyramidSchedule schedule_ = PyramidSchedule::kInteger;
};

}  // namespace

FamilyInfo pyramidkv_family() {
  FamilyInfo f;
  f.family = "pyramidkv";
  f.kind = "evict";
  f.when = "prefill";
  f.summary = "SnapKV with a per-layer budget shrinking linearly over the layers (mean = the nominal budget).";
  f.params = snapkv_params();
  f.params.push_back({"schedule", "integer",
                      "integer (authors / KVCache-Factory: floor divisions, mean overshoots) | float (kvpress: "
                      "round(), uniform fallback when min < window)"});
  f.params.push_back({"beta", "20", "pyramid steepness: the last layer keeps about (budget - window)/beta past "
                                    "tokens (integer >= 1)"});
  f.presets = {
      {"paper",
       {{"window", "32"}, {"kernel", "5"}, {"pooling", "avg"}, {"rows", "sum"}, {"schedule", "integer"},
        {"beta", "20"}},
       "Cai et al. 2024; the authors' code is KVCache-Factory pyramidkv_utils.py PyramidKVCluster (w 32, kernel 5, "
       "avgpool, sum, integer schedule, beta 20)"},
      {"kvcache-factory",
       {{"window", "32"}, {"kernel", "5"}, {"pooling", "avg"}, {"rows", "sum"}, {"schedule", "integer"},
        {"beta", "20"}, {"gqa", "group-then-pool"}, {"group_reduce", "mean"}},
       "KVCache-Factory PyramidKVCluster in kv_head granularity, group mean"},
      {"kvpress",
       {{"window", "64"}, {"kernel", "5"}, {"pooling", "avg"}, {"rows", "mean"}, {"gqa", "pool-then-group"},
        {"group_reduce", "mean"}, {"small_budget", "recent"}, {"schedule", "float"}, {"beta", "20"}},
       "NVIDIA kvpress PyramidKVPress (SnapKVPress scores, window 64, kernel 5, beta 20, float schedule)"},
  };
  f.make = [](const std::string& preset, const Params& p) { return std::make_unique<PyramidKV>(preset, p); };
  return f;
}

}  // namespace kvscope::ref
