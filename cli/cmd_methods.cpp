#include <iostream>

#include "commands.hpp"
#include "kvscope/reference/registry.hpp"

namespace kvscope::cli {
namespace {

void list_methods() {
  std::cout << "Methods: NAME[@PRESET][:KEY=VALUE]...  (the first preset is the default)\n";
  for (const ref::FamilyInfo& f : ref::method_families()) {
    std::cout << "\n" << f.family << "  [" << f.kind << "; " << f.when << "]\n  " << f.summary << "\n";
    if (!f.params.empty()) std::cout << "  parameters:\n";
    for (const ref::ParamDecl& p : f.params)
      std::cout << "    " << p.name << " (default " << p.default_value << "): " << p.help << "\n";
    if (!f.presets.empty()) std::cout << "  presets:\n";
    for (const ref::PresetDecl& p : f.presets) {
      std::cout << "    @" << p.name << ":";
      for (const auto& [k, v] : p.values) std::cout << " " << k << "=" << v;
      std::cout << "\n      " << p.help << "\n";
    }
  }
}

}  // namespace

void add_methods(CLI::App& app, Runner& run) {
  CLI::App* c = app.add_subcommand("methods", "List methods, their parameters and presets");
  c->callback([&run] { run = list_methods; });
}

}  // namespace kvscope::cli
