// `kvscope report RESULTS --out DIR`: plots and a report page from a sweep (or
// `replay --format json`) result file. The work is python/kvscope_report.py
// (matplotlib); this command finds the interpreter and the script and runs it,
// passing its exit code through (docs/sweep.md).
#include <spawn.h>
#include <sys/wait.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kvscope/core/error.hpp"

extern char** environ;

namespace kvscope::cli {
namespace {

struct ReportArgs {
  std::string results;
  std::string out_dir = "report";
  bool all_heatmaps = false;
};

std::string from_env_or(const char* var, const std::string& fallback) {
  const char* v = std::getenv(var);
  return v && *v ? v : fallback;
}

/// Runs argv[0] (searched on PATH when it has no '/'), waits, returns its exit code.
int run_program(const std::vector<std::string>& argv) {
  std::vector<char*> cargv;
  for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, cargv[0], nullptr, nullptr, cargv.data(), environ);
  if (rc != 0)
    throw Error(ErrorKind::kUsage, "cannot run '" + argv[0] + "': " + std::strerror(rc) +
                                       " (kvscope report needs python3 with matplotlib: scripts/install-deps; "
                                       "or set KVSCOPE_PYTHON)");
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) throw Error(ErrorKind::kInternal, std::string("waitpid: ") + std::strerror(errno));
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  throw Error(ErrorKind::kInternal, argv[0] + " was killed by signal " + std::to_string(WTERMSIG(status)));
}

void run_report_command(const ReportArgs& a) {
  const std::string python = from_env_or("KVSCOPE_PYTHON", KVSCOPE_PYTHON);
  const std::filesystem::path script =
      std::filesystem::path(from_env_or("KVSCOPE_PYTHON_DIR", KVSCOPE_PYTHON_DIR)) / "kvscope_report.py";
  if (!std::filesystem::exists(script))
    throw Error(ErrorKind::kIo, "the report script '" + script.string() + "' is missing (set KVSCOPE_PYTHON_DIR)");
  std::vector<std::string> argv = {python, script.string(), a.results, "--out", a.out_dir};
  if (a.all_heatmaps) argv.push_back("--all-heatmaps");
  if (const int code = run_program(argv); code != 0) std::exit(code);  // the script printed why
}

}  // namespace

void add_report(CLI::App& app, Runner& run) {
  auto args = std::make_shared<ReportArgs>();
  CLI::App* c = app.add_subcommand("report", "Plots (PNG) and an HTML/Markdown page from a sweep or replay result file");
  c->add_option("results", args->results, "result file of `kvscope sweep` (or `kvscope replay --format json`)")
      ->required();
  c->add_option("--out,-o", args->out_dir, "output directory")->capture_default_str();
  c->add_flag("--all-heatmaps", args->all_heatmaps, "a layer x head heatmap for every cell, not only the smallest budget");
  c->callback([&run, args] { run = [args] { run_report_command(*args); }; });
}

}  // namespace kvscope::cli
