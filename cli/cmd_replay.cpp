#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>

#include "commands.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/replay/report.hpp"
#include "kvscope/traces/plan_dump.hpp"
#include "kvscope/traces/trace_io.hpp"

namespace kvscope::cli {

std::string default_trace_path() {
  if (const char* env = std::getenv("KVSCOPE_SAMPLE_TRACE"); env && *env) return env;
  return KVSCOPE_SAMPLE_TRACE;
}

namespace {

struct ReplayArgs {
  std::string trace;
  std::string methods = "full,streaming_llm";
  std::string budgets = "50%,25%";
  std::string format = "table";
  std::string out_dir;
  std::string dump_plans;
  std::string backend = "reference";
};

std::ofstream open_out(const std::filesystem::path& p) {
  std::ofstream f(p);
  if (!f) throw Error(ErrorKind::kIo, "cannot write '" + p.string() + "'");
  return f;
}

void run_replay_command(const ReplayArgs& a) {
  replay::ReplayOptions opt;
  opt.methods = MethodSpec::parse_list(a.methods);
  opt.backend = opt::parse_backend(a.backend);
  opt.budgets = Budget::parse_list(a.budgets);

  const std::string path = a.trace.empty() ? default_trace_path() : a.trace;
  const traces::TraceReader trace(path);

  std::unique_ptr<replay::CsvRecordSink> records;
  if (!a.out_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(a.out_dir, ec);
    if (ec) throw Error(ErrorKind::kIo, "cannot create output directory '" + a.out_dir + "': " + ec.message());
    records = std::make_unique<replay::CsvRecordSink>((std::filesystem::path(a.out_dir) / "records.csv").string());
  }
  std::unique_ptr<traces::PlanDumpWriter> dump;
  if (!a.dump_plans.empty()) dump = std::make_unique<traces::PlanDumpWriter>(a.dump_plans);

  const replay::ReplayResult result = replay::run_replay(trace, opt, records.get(), dump.get());
  if (dump) dump->close();

  if (a.format == "json")
    replay::write_json(std::cout, result);
  else if (a.format == "csv")
    replay::write_summary_csv(std::cout, result);
  else
    replay::write_table(std::cout, result);

  if (!a.out_dir.empty()) {
    const std::filesystem::path dir(a.out_dir);
    auto json = open_out(dir / "summary.json");
    replay::write_json(json, result);
    auto csv = open_out(dir / "summary.csv");
    replay::write_summary_csv(csv, result);
    auto table = open_out(dir / "summary.txt");
    replay::write_table(table, result);
  }
}

}  // namespace

void add_replay(CLI::App& app, Runner& run) {
  auto args = std::make_shared<ReplayArgs>();
  CLI::App* c = app.add_subcommand("replay", "Replay methods over a trace and measure attention-output error");
  c->add_option("trace", args->trace, "trace file (default: the bundled sample trace)");
  c->add_option("--method,-m", args->methods, "comma-separated NAME[@PRESET][:KEY=VALUE]... (see `kvscope methods`)")
      ->capture_default_str();
  c->add_option("--budget,-b", args->budgets, "comma-separated budgets per kv head: tokens (128) or ratios (0.5, 50%)")
      ->capture_default_str();
  c->add_option("--format,-f", args->format, "stdout format")->check(CLI::IsMember({"table", "json", "csv"}))
      ->capture_default_str();
  c->add_option("--out,-o", args->out_dir, "also write summary.{json,csv,txt} and per-step records.csv here");
  c->add_option("--backend", args->backend, "who computes prefill compression: reference | cpu")
      ->capture_default_str();
  c->add_option("--dump-plans", args->dump_plans, "write every plan (prefill and final) in CSR form to this HDF5 file");
  c->callback([&run, args] { run = [args] { run_replay_command(*args); }; });
}

}  // namespace kvscope::cli
