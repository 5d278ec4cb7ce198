#include "kvscope/replay/sweep.hpp"

#include <omp.h>

#include <atomic>
#include <exception>
#include <filesystem>
#include <mutex>
#include <optional>
#include <thread>

#include "kvscope/core/error.hpp"
#include "kvscope/replay/replay.hpp"
#include "kvscope/replay/report.hpp"
#include "kvscope/traces/trace_io.hpp"

namespace kvscope::replay {
namespace {

// Every HDF5 call of a sweep (open, read, close) holds this lock.
std::mutex& hdf5_lock() {
  static std::mutex m;
  return m;
}

std::string make_key(const std::string& trace, const std::string& method, const std::string& budget,
                     const std::string& backend) {
  return trace + "\n" + method + "\n" + budget + "\n" + backend;
}

ReplayOptions cell_options(const SweepCell& c) {
  ReplayOptions o;
  o.methods = {c.method};
  o.budgets = {c.budget};
  o.backend = c.backend;
  return o;
}

}  // namespace

std::string SweepCell::key() const {
  return make_key(trace, method.to_string(), budget.label(), opt::backend_name(backend));
}

std::string SweepCell::describe() const {
  return method.to_string() + " " + budget.label() + " " + std::filesystem::path(trace).filename().string() +
         (backend == opt::Backend::kReference ? "" : std::string(" (") + opt::backend_name(backend) + ")");
}

std::vector<SweepCell> sweep_grid(const std::vector<std::string>& traces, const std::vector<MethodSpec>& methods,
                                  const std::vector<Budget>& budgets, opt::Backend backend) {
  if (traces.empty() || methods.empty() || budgets.empty())
    throw Error(ErrorKind::kUsage, "a sweep needs at least one trace, one method and one budget");
  std::vector<SweepCell> cells;
  for (const std::string& t : traces) {
    std::error_code ec;
    const std::filesystem::path abs = std::filesystem::weakly_canonical(std::filesystem::absolute(t), ec);
    const std::string path = ec ? t : abs.string();
    for (const MethodSpec& m : methods)
      for (const Budget& b : budgets) cells.push_back({path, m, b, backend});
  }
  // A repeated trace, method or budget would make two cells with one key.
  std::map<std::string, int> seen;
  for (const SweepCell& c : cells)
    if (++seen[c.key()] == 2)
      throw Error(ErrorKind::kUsage, "the sweep names one cell twice: " + c.describe() +
                                         " (a trace, method or budget is repeated)");
  return cells;
}

std::string stored_cell_key(const nlohmann::json& cell) {
  const auto field = [&](const nlohmann::json& obj, const char* name) -> std::string {
    if (!obj.is_object() || !obj.contains(name) || !obj[name].is_string())
      throw Error(ErrorKind::kIo, std::string("a stored sweep cell has no string field '") + name + "'");
    return obj[name].get<std::string>();
  };
  if (!cell.is_object() || !cell.contains("trace"))
    throw Error(ErrorKind::kIo, "a stored sweep cell has no 'trace' object");
  return make_key(field(cell["trace"], "path"), field(cell, "method"), field(cell, "budget"), field(cell, "backend"));
}

SweepTraces::SweepTraces(const std::vector<SweepCell>& cells) {
  std::lock_guard lock(hdf5_lock());
  for (const SweepCell& c : cells) {
    auto it = readers_.find(c.trace);
    if (it == readers_.end()) it = readers_.emplace(c.trace, std::make_unique<traces::TraceReader>(c.trace)).first;
    try {
      check_replay_options(it->second->meta(), cell_options(c));
    } catch (const Error& e) {
      throw Error(e.kind(), "cell " + c.describe() + ": " + e.what());
    }
  }
}

SweepTraces::~SweepTraces() {
  std::lock_guard lock(hdf5_lock());
  readers_.clear();
}

nlohmann::json SweepTraces::run_cell(const SweepCell& cell) const {
  const traces::TraceReader& reader = *readers_.at(cell.trace);
  const LayerSource read = [&reader](int l) {
    std::lock_guard lock(hdf5_lock());
    return reader.read_layer(l);
  };
  const ReplayResult r = run_replay(reader.meta(), read, cell_options(cell));
  nlohmann::json j = run_json(r.runs.at(0), r.meta);
  j["trace"] = trace_json(r.meta);
  j["trace"]["path"] = cell.trace;
  j["self_check"] = {{"recorded", r.self_check.recorded}, {"max_rel_l2", r.self_check.max_rel_l2}};
  return j;
}

void run_cells(const SweepTraces& traces, const std::vector<SweepCell>& cells, int jobs, int cell_threads,
               const CellDone& done) {
  if (jobs < 1) jobs = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  jobs = std::min<int>(jobs, static_cast<int>(std::max<std::size_t>(1, cells.size())));
  std::atomic<std::size_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex report;  // serialises `done` and the first error
  std::optional<Error> first_error;
  std::exception_ptr first_other;

  const auto worker = [&] {
    if (cell_threads > 0) omp_set_num_threads(cell_threads);  // this thread's parallel regions
    for (std::size_t i; !stop && (i = next++) < cells.size();) {
      const SweepCell& cell = cells[i];
      try {
        const nlohmann::json result = traces.run_cell(cell);
        std::lock_guard lock(report);
        done(cell, result);
      } catch (const Error& e) {
        std::lock_guard lock(report);
        if (!first_error && !first_other) first_error = Error(e.kind(), "cell " + cell.describe() + ": " + e.what());
        stop = true;
      } catch (...) {
        std::lock_guard lock(report);
        if (!first_error && !first_other) first_other = std::current_exception();
        stop = true;
      }
    }
  };
  std::vector<std::jthread> pool;
  for (int t = 1; t < jobs; ++t) pool.emplace_back(worker);
  worker();
  pool.clear();  // joins
  if (first_error) throw *first_error;
  if (first_other) std::rethrow_exception(first_other);
}

}  // namespace kvscope::replay
