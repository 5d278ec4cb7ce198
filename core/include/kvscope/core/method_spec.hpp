// MethodSpec: a method as the user names it on the command line,
//   NAME[@PRESET][:KEY=VALUE]...      e.g. streaming_llm@kvpress:sinks=8
// Parsing is purely syntactic; the method registry (reference/) validates the
// family, preset and every key.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace kvscope {

struct MethodSpec {
  std::string family;
  std::string preset;                         // empty = the family's default preset
  std::map<std::string, std::string> params;  // explicit overrides, applied after the preset

  /// Parses one spec; throws Error(kUsage) naming the offending text.
  static MethodSpec parse(std::string_view text);
  /// Splits a comma-separated list of specs.
  static std::vector<MethodSpec> parse_list(std::string_view text);
  /// Canonical text form (round-trips through parse).
  std::string to_string() const;
};

}  // namespace kvscope
