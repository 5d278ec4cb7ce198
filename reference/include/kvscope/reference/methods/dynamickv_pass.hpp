// DynamicKV's first pass (the layer coupling), one implementation for the reference's and the
// backends' couplings: layers in order, each layer's pooled scores kept, the schedule once the last
// layer is in, and what prefill of a layer reads from it. A coupling supplies only how it scores a
// layer (docs/algorithms/dynamickv.md, "Layer coupling").
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kvscope/reference/methods/dynamickv.hpp"

namespace kvscope::ref {

/// `Scores`: one layer's pooled scores per q head over the Lp past tokens, as the schedule reads
/// them: std::vector<VecX> (the reference) or DynamicKVFlatScores (fp32 backends, no widening).
template <class Scores>
class DynamicKVPass {
 public:
  /// `who` starts the error messages ("dynamickv", "dynamickv (cpu)"). The schedule's
  /// cross-layer top-k goes over the layers through `for_each_layer` (a backend's threads;
  /// empty: one after another).
  DynamicKVPass(const DynamicKVConfig& c, int layers, std::int64_t budget, std::string who,
                ForEachIndex for_each_layer = {});

  /// Layer `layer` (0, 1, ... in order) of `tokens` prompt tokens; the last layer makes the schedule.
  void add_layer(int layer, std::int64_t tokens, Scores scores);
  bool done() const { return static_cast<int>(scores_.size()) == layers_; }
  const DynamicKVSchedule& schedule() const { return schedule_; }

  /// What prefill of one layer reads.
  struct Layer {
    std::int64_t prefix = 0;               // past tokens each head keeps besides the window: prefix[l]
    const Scores* scores = nullptr;        // the layer's pooled scores
    std::unique_ptr<DynamicKVPass> local;  // without a coupling: the one-layer pass `scores` lies in
  };

  /// Prefill of layer `layer` of a `layers`-layer model with `tokens` prompt tokens at `budget`:
  /// from `coupled` (complete, built for this budget) or, without a coupling, from a one-layer pass
  /// over `score()`, exact only for a one-layer model (its schedule needs no other layer). A budget
  /// below the window fails first, as Error(kImpossibleBudget).
  static Layer resolve(const DynamicKVPass* coupled, const DynamicKVConfig& c, const std::string& who, int layer,
                       int layers, std::int64_t tokens, std::int64_t budget, const std::function<Scores()>& score);

 private:
  DynamicKVConfig c_;
  int layers_;
  std::int64_t budget_;
  std::string who_;
  ForEachIndex for_each_layer_;
  std::int64_t tokens_ = 0;
  std::vector<Scores> scores_;  // per layer
  DynamicKVSchedule schedule_;
};

extern template class DynamicKVPass<std::vector<VecX>>;
extern template class DynamicKVPass<DynamicKVFlatScores>;

}  // namespace kvscope::ref
