// kvscope: replay KV-cache compression methods over attention traces.
// Exit codes (README "Exit codes"): 0 ok, 2 usage, 3 invalid trace, 4 I/O,
// 5 bad number, 6 impossible budget, 7 invariant violated, 70 internal.
#include <cstdio>
#include <exception>
#include <iostream>

#include "commands.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/core/heap.hpp"

int main(int argc, char** argv) {
  kvscope::keep_freed_heap_memory();  // plans are allocated and freed per layer
  CLI::App app{"kvscope: simulate and verify KV-cache compression on attention traces"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "kvscope 0.1.0");
  kvscope::cli::Runner run;
  kvscope::cli::add_commands(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints help/version (0) or the parse error
    return code == 0 ? 0 : static_cast<int>(kvscope::ErrorKind::kUsage);
  }
  try {
    run();
    return 0;
  } catch (const kvscope::Error& e) {
    std::fprintf(stderr, "kvscope: %s: %s\n", kvscope::error_kind_name(e.kind()), e.what());
    return e.exit_code();
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "kvscope: out of memory\n");
    return static_cast<int>(kvscope::ErrorKind::kInternal);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvscope: internal error: %s\n", e.what());
    return static_cast<int>(kvscope::ErrorKind::kInternal);
  }
}
