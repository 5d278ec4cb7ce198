// The method registry: every family with its parameters, presets and factory.
// `kvscope methods` prints it; `make_method` turns a MethodSpec into a Method,
// rejecting unknown families, presets, parameters and bad values by name.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kvscope/core/method_spec.hpp"
#include "kvscope/reference/method.hpp"

namespace kvscope::ref {

struct ParamDecl {
  std::string name;
  std::string default_value;
  std::string help;  // includes the accepted values
};

struct PresetDecl {
  std::string name;
  std::map<std::string, std::string> values;  // overrides of the defaults
  std::string help;                           // whose behaviour it pins, with the source
};

/// Parameters after defaults <- preset <- explicit overrides; typed getters
/// throw Error(kUsage) naming the parameter and the bad value.
class Params {
 public:
  Params(std::string family, std::map<std::string, std::string> values)
      : family_(std::move(family)), values_(std::move(values)) {}
  const std::string& text(const std::string& name) const;
  std::int64_t integer(const std::string& name, std::int64_t min_value) const;
  bool boolean(const std::string& name) const;
  double real(const std::string& name) const;
  /// One of `choices`, or an error listing them.
  std::string choice(const std::string& name, const std::vector<std::string>& choices) const;
  const std::map<std::string, std::string>& all() const { return values_; }

 private:
  std::string family_;
  std::map<std::string, std::string> values_;
};

struct FamilyInfo {
  std::string family;
  std::string kind;     // "none", "evict", "merge", ...
  std::string when;     // "prefill", "decode", "prefill + decode"
  std::string summary;
  std::vector<ParamDecl> params;
  std::vector<PresetDecl> presets;  // the first is the default
  std::function<std::unique_ptr<Method>(const std::string& preset, const Params&)> make;
};

const std::vector<FamilyInfo>& method_families();

/// A spec checked against the registry: its family, the preset applied
/// (the family's first when the spec names none) and every parameter resolved
/// (defaults <- preset <- overrides). Unknown names are Error(kUsage).
struct ResolvedSpec {
  const FamilyInfo* family = nullptr;
  std::string preset;
  Params params;
};
ResolvedSpec resolve_spec(const MethodSpec& spec);
std::unique_ptr<Method> make_method(const MethodSpec& spec);

}  // namespace kvscope::ref
