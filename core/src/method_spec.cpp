#include "kvscope/core/method_spec.hpp"

#include "kvscope/core/error.hpp"

namespace kvscope {
namespace {

bool is_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

bool is_name(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s)
    if (!is_name_char(c)) return false;
  return true;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  std::size_t start = 0;
  for (;;) {
    const std::size_t at = s.find(sep, start);
    out.push_back(s.substr(start, at == std::string_view::npos ? std::string_view::npos : at - start));
    if (at == std::string_view::npos) return out;
    start = at + 1;
  }
}

}  // namespace

MethodSpec MethodSpec::parse(std::string_view text) {
  auto bad = [&](const std::string& why) {
    return Error(ErrorKind::kUsage, "method '" + std::string(text) + "': " + why);
  };
  const auto parts = split(text, ':');
  MethodSpec spec;
  std::string_view head = parts[0];
  if (const auto at = head.find('@'); at != std::string_view::npos) {
    spec.preset = std::string(head.substr(at + 1));
    head = head.substr(0, at);
    if (!is_name(spec.preset)) throw bad("preset after '@' must be a non-empty name");
  }
  if (!is_name(head)) throw bad("expected NAME[@PRESET][:KEY=VALUE]...");
  spec.family = std::string(head);
  for (std::size_t i = 1; i < parts.size(); ++i) {
    const auto eq = parts[i].find('=');
    if (eq == std::string_view::npos || eq == 0 || eq + 1 == parts[i].size())
      throw bad("parameter '" + std::string(parts[i]) + "' is not KEY=VALUE");
    const std::string key(parts[i].substr(0, eq));
    if (!is_name(key)) throw bad("parameter name '" + key + "' is not a name");
    if (!spec.params.emplace(key, std::string(parts[i].substr(eq + 1))).second)
      throw bad("parameter '" + key + "' given twice");
  }
  return spec;
}

std::vector<MethodSpec> MethodSpec::parse_list(std::string_view text) {
  std::vector<MethodSpec> out;
  for (std::string_view item : split(text, ',')) out.push_back(parse(item));
  return out;
}

std::string MethodSpec::to_string() const {
  std::string s = family;
  if (!preset.empty()) s += "@" + preset;
  for (const auto& [k, v] : params) s += ":" + k + "=" + v;
  return s;
}

}  // namespace kvscope
