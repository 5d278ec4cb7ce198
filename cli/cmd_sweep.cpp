// `kvscope sweep TRACE... --method --budget --out`: every (trace, method,
// budget) cell replayed, results in one JSON file and its CSV twin, resumable,
// all cores used, sharded over MPI ranks under mpirun (docs/sweep.md).
#include <algorithm>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <filesystem>
#include <set>
#include <thread>

#include "commands.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/replay/sweep.hpp"
#include "kvscope/replay/sweep_store.hpp"
#include "progress.hpp"
#include "sweep_comm.hpp"

namespace kvscope::cli {
namespace {

using nlohmann::json;
using replay::SweepCell;

struct SweepArgs {
  std::vector<std::string> traces;
  std::string methods = "full,streaming_llm";
  std::string budgets = "50%,25%";
  std::string out = "sweep.json";
  std::string backend = "reference";
  int jobs = 0;
  bool restart = false;
};

/// An error as it crosses ranks: its exit code and message.
json error_json(const Error& e) { return {{"code", static_cast<int>(e.kind())}, {"message", e.what()}}; }

std::optional<Error> capture(const std::function<void()>& step) {
  try {
    step();
    return std::nullopt;
  } catch (const Error& e) {
    return e;
  } catch (const std::bad_alloc&) {
    return Error(ErrorKind::kInternal, "out of memory");
  } catch (const std::exception& e) {
    return Error(ErrorKind::kInternal, e.what());
  }
}

/// Runs `step` on every rank, then every rank learns whether any failed, so no
/// rank waits forever in a later collective. Rank 0 reports every rank's error.
void on_all_ranks(SweepComm& comm, const std::function<void()>& step) {
  const std::optional<Error> mine = capture(step);
  const std::vector<std::string> parts = comm.gather(mine ? error_json(*mine).dump() : "");
  std::string verdict;
  if (comm.rank() == 0) {
    std::optional<json> first;
    std::string message;
    for (std::size_t r = 0; r < parts.size(); ++r) {
      if (parts[r].empty()) continue;
      const json e = json::parse(parts[r]);
      if (!first) first = e;
      const std::string m = e["message"].get<std::string>();
      if (message.find(m) != std::string::npos) continue;  // every rank hit the same problem
      message += (message.empty() ? "" : "\n  ") + (comm.size() > 1 ? "rank " + std::to_string(r) + ": " : "") + m;
    }
    if (first) verdict = json{{"code", (*first)["code"]}, {"message", message}}.dump();
  }
  verdict = comm.broadcast(verdict);
  if (verdict.empty()) return;
  const json v = json::parse(verdict);
  const auto kind = static_cast<ErrorKind>(v["code"].get<int>());
  throw Error(kind, comm.rank() == 0 ? v["message"].get<std::string>() : "stopped; rank 0 reports why");
}

/// Cells of this sweep in grid order, then cells kept from earlier sweeps into the same file.
std::vector<json> merge_cells(const std::vector<SweepCell>& grid, std::vector<json> stored, bool& complete) {
  std::map<std::string, json> by_key;
  std::vector<std::string> stored_order;
  for (json& c : stored) {
    const std::string k = replay::stored_cell_key(c);
    if (by_key.emplace(k, std::move(c)).second) stored_order.push_back(k);
  }
  std::vector<json> out;
  std::set<std::string> in_grid;
  complete = true;
  for (const SweepCell& cell : grid) {
    const std::string k = cell.key();
    in_grid.insert(k);
    if (auto it = by_key.find(k); it != by_key.end())
      out.push_back(it->second);
    else
      complete = false;
  }
  for (const std::string& k : stored_order)
    if (!in_grid.count(k)) out.push_back(by_key[k]);
  return out;
}

void print_summary(const std::vector<json>& cells) {
  std::printf("%-40s %7s %-24s %11s %11s %9s %8s\n", "method", "budget", "trace", "relL2 mean", "relL2 max", "cos min",
              "seconds");
  for (const json& c : cells) {
    std::string method = c["method"].get<std::string>();
    if (method.size() > 40) method = method.substr(0, 37) + "...";
    std::string trace = std::filesystem::path(c["trace"]["path"].get<std::string>()).filename().string();
    if (trace.size() > 24) trace = trace.substr(0, 21) + "...";
    const json& s = c["summary"];
    std::printf("%-40s %7s %-24s %11.3e %11.3e %9.6f %8.2f\n", method.c_str(), c["budget"].get<std::string>().c_str(),
                trace.c_str(), s["mean_rel_l2"].get<double>(), s["max_rel_l2"].get<double>(),
                s["min_cosine"].get<double>(), c["seconds"].get<double>());
  }
}

void run_sweep_command(const SweepArgs& a) {
  const std::unique_ptr<SweepComm> comm = make_sweep_comm();
  const int rank = comm->rank(), ranks = comm->size();
  const bool root = rank == 0;

  // 1. Every rank plans the grid and opens the traces: bad input fails here, before any cell runs.
  std::vector<SweepCell> grid;
  std::unique_ptr<replay::SweepTraces> traces;
  on_all_ranks(*comm, [&] {
    grid = replay::sweep_grid(a.traces, MethodSpec::parse_list(a.methods), Budget::parse_list(a.budgets),
                              opt::parse_backend(a.backend));
    traces = std::make_unique<replay::SweepTraces>(grid);
  });

  // 2. Rank 0 reads the cells finished by earlier runs; every rank skips them.
  std::vector<json> stored;
  on_all_ranks(*comm, [&] {
    if (!root) return;
    if (a.restart) {
      replay::remove_sweep_journals(a.out);
      return;
    }
    stored = replay::load_finished_cells(a.out);
  });
  json keys = json::array();
  for (const json& c : stored) keys.push_back(replay::stored_cell_key(c));
  std::set<std::string> finished;
  for (const json& k : json::parse(comm->broadcast(keys.dump()))) finished.insert(k.get<std::string>());
  std::vector<SweepCell> remaining, mine;
  for (const SweepCell& c : grid)
    if (!finished.count(c.key())) remaining.push_back(c);
  for (std::size_t i = 0; i < remaining.size(); ++i)
    if (static_cast<int>(i % static_cast<std::size_t>(ranks)) == rank) mine.push_back(remaining[i]);

  // 3. Run this rank's cells; the machine's cores are shared by its ranks.
  const int cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / comm->local_size());
  const int jobs = a.jobs > 0 ? a.jobs : cores;
  const int cell_threads = std::max(1, cores / std::min<int>(jobs, static_cast<int>(std::max<std::size_t>(1, mine.size()))));
  if (root)
    std::fprintf(stderr, "sweep: %zu cells, %zu finished earlier, %zu to run on %d rank%s x %d job%s -> %s\n",
                 grid.size(), grid.size() - remaining.size(), remaining.size(), ranks, ranks > 1 ? "s" : "", jobs,
                 jobs > 1 ? "s" : "", a.out.c_str());
  std::vector<json> computed;
  const std::optional<Error> run_error = capture([&] {
    if (mine.empty()) return;
    replay::SweepJournal journal(a.out, rank);
    Progress progress(root ? grid.size() - remaining.size() + mine.size() : mine.size(),
                      root ? grid.size() - remaining.size() : 0, ranks > 1 ? "rank " + std::to_string(rank) + " " : "");
    replay::run_cells(*traces, mine, jobs, cell_threads, [&](const SweepCell& cell, const json& result) {
      journal.append(result);
      computed.push_back(result);
      progress.advance(cell.describe());
    });
    progress.finish();
  });

  // 4. Rank 0 gathers every rank's cells (and errors) and writes one result file.
  const json message = {{"cells", computed}, {"error", run_error ? error_json(*run_error) : json()}};
  const std::vector<std::string> parts = comm->gather(message.dump());
  bool complete = false;
  on_all_ranks(*comm, [&] {
    if (!root) return;
    std::optional<Error> first;
    for (std::size_t r = 0; r < parts.size(); ++r) {
      const json part = json::parse(parts[r]);
      for (const json& c : part["cells"]) stored.push_back(c);
      if (!part["error"].is_null()) {
        const std::string m = part["error"]["message"].get<std::string>();
        if (!first)
          first = Error(static_cast<ErrorKind>(part["error"]["code"].get<int>()),
                        (ranks > 1 ? "rank " + std::to_string(r) + ": " : "") + m);
        else
          std::fprintf(stderr, "kvscope: also failed on rank %zu: %s\n", r, m.c_str());
      }
    }
    const std::vector<json> cells = merge_cells(grid, std::move(stored), complete);
    replay::write_sweep_results(a.out, cells, complete);
    if (complete) replay::remove_sweep_journals(a.out);
    if (first) throw Error(first->kind(), std::string(first->what()) + "\n  finished cells are in '" + a.out +
                                              "'; run the same command again to resume");
    print_summary(cells);
    std::fprintf(stderr, "sweep: wrote %s and %s (%s)\n", a.out.c_str(), replay::sweep_csv_path(a.out).c_str(),
                 complete ? "complete" : "incomplete");
  });
}

}  // namespace

void add_sweep(CLI::App& app, Runner& run) {
  auto args = std::make_shared<SweepArgs>();
  CLI::App* c = app.add_subcommand(
      "sweep", "Replay every (trace, method, budget) cell into one result file; resumable; MPI-sharded under mpirun");
  c->add_option("traces", args->traces, "trace files (default: the bundled sample trace)");
  c->add_option("--method,-m", args->methods, "comma-separated NAME[@PRESET][:KEY=VALUE]... (see `kvscope methods`)")
      ->capture_default_str();
  c->add_option("--budget,-b", args->budgets, "comma-separated budgets per kv head: tokens (128) or ratios (0.5, 50%)")
      ->capture_default_str();
  c->add_option("--out,-o", args->out, "result file (JSON; its CSV twin is written beside it); resumed if it exists")
      ->capture_default_str();
  c->add_option("--backend", args->backend, "who computes prefill compression: reference | cpu")->capture_default_str();
  c->add_option("--jobs,-j", args->jobs, "cells run at once per rank (default: this rank's share of the cores)")
      ->check(CLI::NonNegativeNumber);
  c->add_flag("--restart", args->restart, "ignore cells finished by earlier runs (the result file is rewritten)");
  c->callback([&run, args] {
    run = [args] {
      SweepArgs a = *args;
      if (a.traces.empty()) a.traces = {default_trace_path()};
      run_sweep_command(a);
    };
  });
}

}  // namespace kvscope::cli
