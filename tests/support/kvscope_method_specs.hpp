// The method specs a parameterised test runs over (every family with its
// default preset and each named preset), and their gtest-safe names.
#pragma once

#include <gtest/gtest.h>

#include <cctype>
#include <functional>
#include <string>
#include <vector>

#include "kvscope/reference/registry.hpp"

namespace kvscope::tests {

/// "family" and "family@preset" for every registered family `keep` accepts.
inline std::vector<std::string> method_specs(const std::function<bool(const std::string&)>& keep = {}) {
  std::vector<std::string> specs;
  for (const auto& f : ref::method_families()) {
    if (keep && !keep(f.family)) continue;
    specs.push_back(f.family);
    for (std::size_t i = 1; i < f.presets.size(); ++i) specs.push_back(f.family + "@" + f.presets[i].name);
  }
  return specs;
}

/// A spec as a test name: every non-alphanumeric character becomes '_'.
inline std::string spec_test_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string s = info.param;
  for (char& ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
}

}  // namespace kvscope::tests
