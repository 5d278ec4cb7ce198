// `kvscope verify`: the differential checks of a backend against the
// reference over a whole trace, as a pass/fail table (a CI gate for users).
// A failing (method, budget, layer) writes a repro file and prints the
// command that replays it.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>

#include "commands.hpp"
#include "kvscope/core/budget.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/opt/layer_storage.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/replay/layer_input.hpp"
#include "kvscope/traces/repro.hpp"
#include "kvscope/traces/trace_io.hpp"
#include "kvscope/verify/harness.hpp"

namespace kvscope::cli {
namespace {

struct VerifyArgs {
  std::string trace;
  std::string backend = "cpu";
  std::string methods;  // default: every family the backend implements
  std::string budgets;  // empty: the repro file's budget, else 50%,25%
  std::string repro_dir = "kvscope-repro";
  int threads = 0;
  bool log_count_bias = false;
};

struct Row {
  std::string method, budget;
  int layers = 0;
  std::int64_t ties = 0, mismatches = 0;
  double jaccard = 0, k = 0, v = 0, out = 0, out_bound = 0;
  bool deterministic = true;
  std::string failure;
  std::string repro;
};

void print_table(const std::vector<Row>& rows, const std::string& backend, int threads) {
  std::printf("%-34s %-7s %6s %5s %8s %8s %10s %10s %10s %10s %4s  %s\n", "method", "budget", "layers", "ties",
              "mismatch", "jaccard", "K rel-L2", "V rel-L2", "out rel-L2", "out bound", "det", "result");
  for (const Row& r : rows)
    std::printf("%-34s %-7s %6d %5lld %8lld %8.2e %10.2e %10.2e %10.2e %10.2e %4s  %s\n", r.method.c_str(),
                r.budget.c_str(), r.layers, static_cast<long long>(r.ties), static_cast<long long>(r.mismatches),
                r.jaccard, r.k, r.v, r.out, r.out_bound, r.deterministic ? "yes" : "NO",
                r.failure.empty() ? "PASS" : "FAIL");
  std::printf("backend %s vs reference; determinism compared at 1 and %d threads; tolerances: docs/verification.md\n",
              backend.c_str(), threads);
}

void run_verify_command(VerifyArgs a) {
  const std::string path = a.trace.empty() ? default_trace_path() : a.trace;
  const std::optional<traces::ReproInfo> repro = traces::read_repro_info(path);
  if (repro) {  // a repro file names its own case unless told otherwise
    if (a.methods.empty()) a.methods = repro->method;
    if (a.budgets.empty()) a.budgets = repro->budget;
  }
  if (a.budgets.empty()) a.budgets = "50%,25%";
  const opt::Backend backend = opt::parse_backend(a.backend);
  if (backend == opt::Backend::kReference)
    throw Error(ErrorKind::kUsage, "verify compares a backend with the reference: --backend cpu (or cuda)");
  const bool cuda = backend == opt::Backend::kCuda;
  if (a.methods.empty())
    for (const std::string& f : cuda ? opt::cuda_families() : opt::cpu_families())
      a.methods += (a.methods.empty() ? "" : ",") + f;
  const std::vector<MethodSpec> specs = MethodSpec::parse_list(a.methods);
  const std::vector<Budget> budgets = Budget::parse_list(a.budgets);

  const traces::TraceReader trace(path);
  TraceMeta meta = trace.meta();
  // Configure everything before reading data: unknown methods fail fast.
  std::vector<std::unique_ptr<ref::Method>> refs;
  std::vector<std::unique_ptr<opt::BackendMethod>> opts;
  for (const MethodSpec& s : specs) {
    refs.push_back(ref::make_method(s));
    opts.push_back(cuda ? opt::make_cuda_method(s) : opt::make_cpu_method(s));
  }
  const int first_layer = repro ? repro->layer : 0;
  if (repro) meta.layers = repro->layers;  // layer-dependent methods see the original position

  verify::VerifyOptions vo;
  vo.threads = a.threads;
  vo.log_count_bias = a.log_count_bias;
  std::vector<Row> rows;
  for (std::size_t m = 0; m < specs.size(); ++m)
    for (const Budget& b : budgets) {
      Row r;
      r.method = specs[m].to_string();
      r.budget = b.label();
      rows.push_back(std::move(r));
    }
  // Layer-coupled methods (DynamicKV) see every layer on both sides first.
  std::vector<std::unique_ptr<ref::LayerCoupling>> ref_couplings;
  std::vector<std::unique_ptr<opt::BackendCoupling>> opt_couplings;
  for (std::size_t m = 0; m < specs.size(); ++m)
    for (const Budget& b : budgets) {
      ref_couplings.push_back(refs[m]->coupling(meta, b.resolve(meta.prompt_len)));
      opt_couplings.push_back(opts[m]->coupling(meta, b.resolve(meta.prompt_len)));
    }
  const auto coupled = std::find_if(ref_couplings.begin(), ref_couplings.end(), [](const auto& c) { return c != nullptr; });
  if (coupled != ref_couplings.end()) {
    if (repro)
      throw Error(ErrorKind::kUsage, "a repro file holds one layer, and the layer-coupled method " +
                                         specs[static_cast<std::size_t>(coupled - ref_couplings.begin()) / budgets.size()]
                                             .to_string() +
                                         " needs every layer: run verify on the original trace");
    for (int l = 0; l < meta.layers; ++l) {
      const LayerData data = trace.read_layer(l);
      const ref::LayerInput in = replay::make_layer_input(meta, l, data);
      const opt::LayerStorage storage = opt::pack_layer(meta, l, data);
      for (std::size_t c = 0; c < ref_couplings.size(); ++c) {
        if (ref_couplings[c]) ref_couplings[c]->observe(in);
        if (opt_couplings[c]) opt_couplings[c]->observe(storage);
      }
    }
  }

  int threads = 0;
  for (int i = 0; i < trace.meta().layers; ++i) {
    const LayerData data = trace.read_layer(i);
    const int layer = first_layer + i;
    for (std::size_t m = 0; m < specs.size(); ++m)
      for (std::size_t bi = 0; bi < budgets.size(); ++bi) {
        Row& r = rows[m * budgets.size() + bi];
        const std::int64_t tokens = budgets[bi].resolve(meta.prompt_len);
        const std::size_t cell = m * budgets.size() + bi;
        const verify::LayerVerdict v = verify::verify_layer(*refs[m], *opts[m], meta, layer, data, tokens, vo,
                                                            {ref_couplings[cell].get(), opt_couplings[cell].get()});
        threads = v.threads;
        ++r.layers;
        for (const verify::SelectionDiff& s : v.heads) {
          r.ties += s.ties;
          r.mismatches += s.mismatches;
          r.jaccard = std::max(r.jaccard, s.jaccard);
        }
        r.k = std::max(r.k, v.keys.rel_l2);
        r.v = std::max(r.v, v.values.rel_l2);
        r.out = std::max(r.out, v.outputs.rel_l2);
        r.out_bound = std::max(r.out_bound, v.outputs.bound);
        r.deterministic = r.deterministic && v.deterministic;
        if (!v.pass() && r.failure.empty()) {
          r.failure = "layer " + std::to_string(layer) + ": " + v.failure;
          std::filesystem::create_directories(a.repro_dir);
          std::string name = r.method + "_" + r.budget + "_layer" + std::to_string(layer) + ".h5";
          for (char& c : name)
            if (c == ':' || c == '@' || c == '%' || c == '/' || c == '=' || c == ',') c = '_';
          r.repro = (std::filesystem::path(a.repro_dir) / name).string();
          traces::write_repro(r.repro, trace.meta(), data,
                              {r.method, r.budget, a.backend, r.failure, layer, meta.layers, 0}, v.evidence);
        }
      }
  }
  print_table(rows, a.backend, threads);
  int failed = 0;
  for (const Row& r : rows)
    if (!r.failure.empty()) {
      ++failed;
      std::fprintf(stderr, "FAIL %s @ %s: %s\n  repro: kvscope verify %s --backend %s\n", r.method.c_str(),
                   r.budget.c_str(), r.failure.c_str(), r.repro.c_str(), a.backend.c_str());
    }
  if (failed > 0)
    throw Error(ErrorKind::kInvariant, std::to_string(failed) + " of " + std::to_string(rows.size()) +
                                           " (method, budget) checks failed against the reference");
}

}  // namespace

void add_verify(CLI::App& app, Runner& run) {
  auto args = std::make_shared<VerifyArgs>();
  CLI::App* c = app.add_subcommand("verify", "Check a backend against the reference over a whole trace (pass/fail table)");
  c->add_option("trace", args->trace, "trace or repro file (default: the bundled sample trace)");
  c->add_option("--backend", args->backend, "backend to check: cpu | cuda")->capture_default_str();
  c->add_option("--method,-m", args->methods, "comma-separated methods (default: every method the backend has)");
  c->add_option("--budget,-b", args->budgets, "comma-separated budgets per kv head (default: 50%,25%, or a repro file's)");
  c->add_option("--threads", args->threads, "threads of the determinism run (default: OpenMP's)")->check(CLI::NonNegativeNumber);
  c->add_flag("--log-count-bias", args->log_count_bias, "decode attention adds log(count) for merged slots");
  c->add_option("--repro-dir", args->repro_dir, "where failing cases are written")->capture_default_str();
  c->callback([&run, args] { run = [args] { run_verify_command(*args); }; });
}

}  // namespace kvscope::cli
