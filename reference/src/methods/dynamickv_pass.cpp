#include "kvscope/reference/methods/dynamickv_pass.hpp"

#include "kvscope/core/error.hpp"

namespace kvscope::ref {

template <class Scores>
DynamicKVPass<Scores>::DynamicKVPass(const DynamicKVConfig& c, int layers, std::int64_t budget, std::string who,
                                     ForEachIndex for_each_layer)
    : c_(c), layers_(layers), budget_(budget), who_(std::move(who)), for_each_layer_(std::move(for_each_layer)) {}

template <class Scores>
void DynamicKVPass<Scores>::add_layer(int layer, std::int64_t tokens, Scores scores) {
  if (layer != static_cast<int>(scores_.size()))
    throw Error(ErrorKind::kInternal, who_ + ": layers must be observed in order (got layer " + std::to_string(layer) +
                                          ", expected " + std::to_string(scores_.size()) + ")");
  if (layer == 0) tokens_ = tokens;
  if (tokens != tokens_) throw Error(ErrorKind::kInternal, who_ + ": layers disagree on the prompt length");
  scores_.push_back(std::move(scores));
  if (!done()) return;
  const DynamicKVScheduleConfig sc = dynamickv_schedule_config(c_, layers_, tokens_, budget_);
  schedule_ = dynamickv_schedule(scores_, sc, for_each_layer_);
}

template <class Scores>
typename DynamicKVPass<Scores>::Layer DynamicKVPass<Scores>::resolve(const DynamicKVPass* coupled,
                                                                     const DynamicKVConfig& c, const std::string& who,
                                                                     int layer, int layers, std::int64_t tokens,
                                                                     std::int64_t budget,
                                                                     const std::function<Scores()>& score) {
  dynamickv_schedule_config(c, 1, tokens, budget);  // the budget's own check comes first
  Layer out;
  if (coupled) {
    if (!coupled->done())
      throw Error(ErrorKind::kUsage, who + ": the layer coupling has not observed every layer yet");
    if (coupled->budget_ != budget)
      throw Error(ErrorKind::kInternal, who + ": the coupling was built for budget " +
                                            std::to_string(coupled->budget_) + ", prefill got " + std::to_string(budget));
  } else {
    if (layers != 1)
      throw Error(ErrorKind::kUsage, who + ": prefill of a " + std::to_string(layers) +
                                         "-layer model needs the layer coupling (Method::coupling, observe() on "
                                         "every layer first; replay does this)");
    out.local = std::make_unique<DynamicKVPass>(c, 1, budget, who);
    out.local->add_layer(0, tokens, score());
  }
  const DynamicKVPass& pass = coupled ? *coupled : *out.local;
  out.scores = &pass.scores_.at(coupled ? static_cast<std::size_t>(layer) : 0);
  out.prefix = pass.schedule_.prefix.at(static_cast<std::size_t>(layer));
  return out;
}

template class DynamicKVPass<std::vector<VecX>>;
template class DynamicKVPass<DynamicKVFlatScores>;

}  // namespace kvscope::ref
