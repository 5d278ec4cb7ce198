// Plan dumps: the plans a replay produced, per (method, budget, layer,
// kv head, stage), stored in CSR form in HDF5 so a run can be inspected or
// re-checked offline (docs/trace-format.md, "Plan dumps"). Layout:
//   /                       attrs schema = "kvscope.plans", schema_version = 1
//   /runs/run_<i>           attrs method, budget (one run per (method, budget))
//     layer_<l>/kv_head_<h>/<stage>     stage: "prefill" or "final"
//       row_ptr [slots+1], token [nnz], position [slots], count [slots]: int64
//       coef_k [nnz], coef_v [nnz]: float64
//       attrs n (int64), position_mode ("original" | "rerotated")
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kvscope/core/plan.hpp"

namespace kvscope::traces {

inline constexpr const char* kPlanSchemaName = "kvscope.plans";
inline constexpr int kPlanSchemaVersion = 1;

/// Writes plans as they are produced. A plan must be well formed (CSR arrays
/// consistent, tokens < n): a malformed one is kInvariant. Adding the same
/// (method, budget, layer, kv_head, stage) twice, or a stage other than
/// "prefill"/"final", is kUsage.
class PlanDumpWriter {
 public:
  explicit PlanDumpWriter(const std::string& path);
  ~PlanDumpWriter();
  PlanDumpWriter(const PlanDumpWriter&) = delete;
  PlanDumpWriter& operator=(const PlanDumpWriter&) = delete;

  void add(const std::string& method, const std::string& budget, int layer, int kv_head, const std::string& stage,
           const kvscope::Plan& plan);
  /// Flushes and closes (also done, without reporting errors, by the destructor).
  void close();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct PlanDumpRecord {
  std::string method, budget, stage;
  int layer = 0;
  int kv_head = 0;
  kvscope::Plan plan;
};

/// Reads every plan back, validated like a trace (kTraceInvalid / kIo), ordered
/// by run (first appearance of its (method, budget)), layer, kv head, then
/// stage (prefill before final).
std::vector<PlanDumpRecord> read_plan_dumps(const std::string& path);

}  // namespace kvscope::traces
