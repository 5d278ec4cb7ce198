// Replay: every (method, budget) over a trace, layer by layer (one layer in
// memory at a time). Prefill compression with the recorded prompt, then every
// decode step with the recorded query, key and value; each step's attention
// output over the compressed cache is compared with the full cache's.
// Open-loop: every layer sees the recorded inputs of the full-cache run.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kvscope/core/budget.hpp"
#include "kvscope/core/method_spec.hpp"
#include "kvscope/core/trace_data.hpp"
#include "kvscope/opt/backend.hpp"
#include "kvscope/replay/metrics.hpp"

namespace kvscope::traces {
class TraceReader;
class PlanDumpWriter;
}  // namespace kvscope::traces

namespace kvscope::replay {

struct ReplayOptions {
  std::vector<MethodSpec> methods;
  std::vector<Budget> budgets;
  /// Who computes prefill compression: the reference, or the optimized CPU
  /// backend (its plans and its storage-precision cache; decode policies and
  /// the metrics stay the reference's).
  opt::Backend backend = opt::Backend::kReference;
};

/// One (layer, q head, decode step) measurement of one run.
struct StepRecord {
  int run = 0;  // index into ReplayResult::runs
  int layer = 0;
  int q_head = 0;
  std::int64_t step = 0;
  std::int64_t slots = 0;  // cache slots the query attended over
  StepMetrics metrics;
};

/// Receives every StepRecord as it is produced (streamed to CSV by the CLI).
class RecordSink {
 public:
  virtual ~RecordSink() = default;
  virtual void on_record(const StepRecord& record) = 0;
};

struct RunSummary {
  std::string label;           // the method as the user named it ("streaming_llm@kvpress")
  std::string method;          // resolved name, every parameter spelled out
  std::string budget;          // as given ("50%", "128")
  std::int64_t budget_tokens = 0;  // resolved against the prompt length
  Aggregate all;
  std::vector<Aggregate> per_layer_head;  // [layer * q_heads + q_head]
  std::vector<Aggregate> per_step;        // [step]
  std::int64_t final_kv_bytes = 0;        // compressed K+V at the last step, all layers and kv heads
  std::int64_t full_kv_bytes = 0;         // the same for the full cache
  std::int64_t plans_checked = 0;         // plan-checker passes (prefill + every decode step)
  std::string backend = "reference";      // who computed prefill compression
  double seconds = 0;
};

/// Recorded outputs (decode/o) against the full-cache reference: checks the trace itself.
struct TraceSelfCheck {
  bool recorded = false;
  double max_rel_l2 = 0;
};

struct ReplayResult {
  TraceMeta meta;
  std::vector<RunSummary> runs;
  TraceSelfCheck self_check;
};

/// Runs the replay. Unknown methods and impossible budgets fail before any data
/// is read. A plan that breaks its method's laws throws Error(kInvariant).
ReplayResult run_replay(const traces::TraceReader& trace, const ReplayOptions& options,
                        RecordSink* sink = nullptr, traces::PlanDumpWriter* dump = nullptr);

/// The validation run_replay does before reading data (methods, parameters,
/// budgets, backend, decode steps), alone: throws the same Error.
void check_replay_options(const TraceMeta& meta, const ReplayOptions& options);

/// Gives layer l's data (called once per layer, in order).
using LayerSource = std::function<LayerData(int layer)>;

/// The same replay over layers from anywhere (tests feed generated layers).
ReplayResult run_replay(const TraceMeta& meta, const LayerSource& read_layer, const ReplayOptions& options,
                        RecordSink* sink = nullptr, traces::PlanDumpWriter* dump = nullptr);

}  // namespace kvscope::replay
