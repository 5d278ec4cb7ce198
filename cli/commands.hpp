// Subcommands of the `kvscope` program. Each adds itself to the app and runs
// when selected; errors are kvscope::Error, turned into exit codes by main.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>

namespace kvscope::cli {

using Runner = std::function<void()>;

/// Registers `name` on `app`; returns the subcommand and sets `run` to its action.
void add_replay(CLI::App& app, Runner& run);
void add_synth(CLI::App& app, Runner& run);
void add_inspect(CLI::App& app, Runner& run);
void add_methods(CLI::App& app, Runner& run);
void add_verify(CLI::App& app, Runner& run);
void add_sweep(CLI::App& app, Runner& run);
void add_report(CLI::App& app, Runner& run);

/// Every subcommand, in `kvscope --help` order (main and the CLI fuzzer share this list).
inline void add_commands(CLI::App& app, Runner& run) {
  add_replay(app, run);
  add_verify(app, run);
  add_sweep(app, run);
  add_report(app, run);
  add_synth(app, run);
  add_inspect(app, run);
  add_methods(app, run);
}

/// The bundled sample trace: $KVSCOPE_SAMPLE_TRACE, else the copy in the source tree.
std::string default_trace_path();

}  // namespace kvscope::cli
