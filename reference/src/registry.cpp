#include "kvscope/reference/registry.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>

#include "kvscope/core/error.hpp"
#include "kvscope/reference/methods/cam.hpp"
#include "kvscope/reference/methods/full.hpp"
#include "kvscope/reference/methods/h2o.hpp"
#include "kvscope/reference/methods/knorm.hpp"
#include "kvscope/reference/methods/streaming_llm.hpp"
#include "kvscope/reference/methods/tova.hpp"
#include "kvscope/reference/methods/snapkv.hpp"
#include "kvscope/reference/methods/pyramidkv.hpp"
#include "kvscope/reference/methods/adakv.hpp"
#include "kvscope/reference/methods/kvmerger.hpp"
#include "kvscope/reference/methods/weightedkv.hpp"
#include "kvscope/reference/methods/dynamickv.hpp"
#include "kvscope/reference/methods/ems.hpp"

namespace kvscope::ref {

const std::string& Params::text(const std::string& name) const {
  const auto it = values_.find(name);
  if (it == values_.end()) throw Error(ErrorKind::kInternal, family_ + ": parameter '" + name + "' was never declared");
  return it->second;
}

std::int64_t Params::integer(const std::string& name, std::int64_t min_value) const {
  const std::string& s = text(name);
  std::int64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size())
    throw Error(ErrorKind::kUsage, family_ + ": parameter '" + name + "' must be an integer, got '" + s + "'");
  if (v < min_value)
    throw Error(ErrorKind::kUsage, family_ + ": parameter '" + name + "' must be >= " + std::to_string(min_value) + ", got " + s);
  return v;
}

bool Params::boolean(const std::string& name) const {
  const std::string& s = text(name);
  if (s == "true" || s == "1" || s == "on") return true;
  if (s == "false" || s == "0" || s == "off") return false;
  throw Error(ErrorKind::kUsage, family_ + ": parameter '" + name + "' must be true or false, got '" + s + "'");
}

double Params::real(const std::string& name) const {
  const std::string& s = text(name);
  double v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || !std::isfinite(v))
    throw Error(ErrorKind::kUsage, family_ + ": parameter '" + name + "' must be a finite number, got '" + s + "'");
  return v;
}

std::string Params::choice(const std::string& name, const std::vector<std::string>& choices) const {
  const std::string& s = text(name);
  if (std::find(choices.begin(), choices.end(), s) != choices.end()) return s;
  std::string list;
  for (const auto& c : choices) list += (list.empty() ? "" : ", ") + c;
  throw Error(ErrorKind::kUsage, family_ + ": parameter '" + name + "' must be one of {" + list + "}, got '" + s + "'");
}

const std::vector<FamilyInfo>& method_families() {
  static const std::vector<FamilyInfo> families = {full_family(), streaming_llm_family(), h2o_family(), tova_family(), knorm_family(), cam_family(), snapkv_family(), pyramidkv_family(), adakv_family(), kvmerger_family(), weightedkv_family(), dynamickv_family(), ems_family()};
  return families;
}

ResolvedSpec resolve_spec(const MethodSpec& spec) {
  const auto& fams = method_families();
  const auto fam = std::find_if(fams.begin(), fams.end(), [&](const FamilyInfo& f) { return f.family == spec.family; });
  if (fam == fams.end()) {
    std::string list;
    for (const auto& f : fams) list += (list.empty() ? "" : ", ") + f.family;
    throw Error(ErrorKind::kUsage, "unknown method '" + spec.family + "' (known: " + list + "; see `kvscope methods`)");
  }
  std::map<std::string, std::string> values;
  for (const auto& p : fam->params) values[p.name] = p.default_value;
  const PresetDecl* preset = fam->presets.empty() ? nullptr : &fam->presets.front();
  if (!spec.preset.empty()) {
    const auto it = std::find_if(fam->presets.begin(), fam->presets.end(),
                                 [&](const PresetDecl& p) { return p.name == spec.preset; });
    if (it == fam->presets.end()) {
      std::string list;
      for (const auto& p : fam->presets) list += (list.empty() ? "" : ", ") + p.name;
      throw Error(ErrorKind::kUsage, spec.family + ": unknown preset '" + spec.preset + "' (known: " +
                                         (list.empty() ? "none" : list) + ")");
    }
    preset = &*it;
  }
  if (preset)
    for (const auto& [k, v] : preset->values) values[k] = v;
  for (const auto& [k, v] : spec.params) {
    if (!values.count(k)) {
      std::string list;
      for (const auto& p : fam->params) list += (list.empty() ? "" : ", ") + p.name;
      throw Error(ErrorKind::kUsage, spec.family + ": unknown parameter '" + k + "' (known: " +
                                         (list.empty() ? "none" : list) + ")");
    }
    values[k] = v;
  }
  return {&*fam, preset ? preset->name : std::string(), Params(spec.family, std::move(values))};
}

std::unique_ptr<Method> make_method(const MethodSpec& spec) {
  const ResolvedSpec r = resolve_spec(spec);
  return r.family->make(r.preset, r.params);
}

}  // namespace kvscope::ref

namespace kvscope::ref {

std::string method_name(const std::string& family, const std::string& preset,
                        const std::map<std::string, std::string>& params) {
  MethodSpec s{family, preset, params};
  return s.to_string();
}

}  // namespace kvscope::ref
