// The command-line parser: arbitrary argv (NUL-separated words) through the
// same CLI11 app main() builds. Parsing must end in success or a ParseError
// (exit code 2); the selected command is not run (it would touch files).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "commands.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::string> words{"kvscope"};
  std::string word;
  for (std::size_t i = 0; i < size && words.size() < 64; ++i) {
    if (data[i] == 0) {
      words.push_back(word);
      word.clear();
    } else {
      word += static_cast<char>(data[i]);
    }
  }
  if (!word.empty()) words.push_back(word);
  std::vector<char*> argv;
  for (std::string& w : words) argv.push_back(w.data());

  CLI::App app{"kvscope"};
  app.require_subcommand(1);
  kvscope::cli::Runner run;
  kvscope::cli::add_commands(app, run);
  try {
    app.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const CLI::ParseError&) {
    // --help/--version and every malformed command line end here.
  }
  return 0;
}
