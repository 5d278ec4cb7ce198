// Sweeps (docs/sweep.md): every (trace, method, budget) cell replayed on its
// own, so that cells run in parallel, shard across MPI ranks and resume one by
// one. A cell's result is the JSON object of replay::run_json plus its trace.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kvscope/core/budget.hpp"
#include "kvscope/core/method_spec.hpp"
#include "kvscope/opt/backend.hpp"

namespace kvscope::traces {
class TraceReader;
}

namespace kvscope::replay {

struct SweepCell {
  std::string trace;  // absolute, normalised path (the same file resumes under any spelling)
  MethodSpec method;
  Budget budget;
  opt::Backend backend = opt::Backend::kReference;
  /// Identity in result files: trace, canonical method, budget label, backend.
  std::string key() const;
  /// "snapkv 50% sample.h5": for progress lines and errors.
  std::string describe() const;
};

/// The grid, trace-major (each trace, each method, each budget).
std::vector<SweepCell> sweep_grid(const std::vector<std::string>& traces, const std::vector<MethodSpec>& methods,
                                  const std::vector<Budget>& budgets, opt::Backend backend);

/// The key of a stored cell (the same as SweepCell::key of the cell that made it);
/// throws Error(kIo) naming the missing field.
std::string stored_cell_key(const nlohmann::json& cell);

/// Opens every trace of `cells` once and checks each cell's method, budget and
/// backend against its trace, so that a bad input fails before any cell runs.
/// Layer reads are serialised by one lock (Debian's libhdf5 is not built
/// thread-safe); everything else runs concurrently.
class SweepTraces {
 public:
  explicit SweepTraces(const std::vector<SweepCell>& cells);
  ~SweepTraces();
  SweepTraces(const SweepTraces&) = delete;
  SweepTraces& operator=(const SweepTraces&) = delete;

  /// Replays one cell; safe to call from several threads at once.
  nlohmann::json run_cell(const SweepCell& cell) const;

 private:
  std::map<std::string, std::unique_ptr<traces::TraceReader>> readers_;
};

/// Called, one call at a time, as each cell finishes.
using CellDone = std::function<void(const SweepCell& cell, const nlohmann::json& result)>;

/// Runs `cells` on `jobs` threads, one cell per thread at a time; the OpenMP
/// kernels of the cpu backend inside a cell use `cell_threads` threads (0:
/// OpenMP's default; a sweep gives each cell its share of the cores). The first failing cell
/// stops new cells from starting; running ones finish (and are reported), then
/// its Error is rethrown with the cell named.
void run_cells(const SweepTraces& traces, const std::vector<SweepCell>& cells, int jobs, int cell_threads,
               const CellDone& done);

}  // namespace kvscope::replay
