// Shared helpers of the method tests: build a method from its spec text, and
// the ErrorKind a call throws.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "kvscope/core/error.hpp"
#include "kvscope/core/method_spec.hpp"
#include "kvscope/reference/registry.hpp"

namespace kvscope::tests {

inline std::unique_ptr<ref::Method> make(const std::string& spec) {
  return ref::make_method(MethodSpec::parse(spec));
}

/// The kind of the kvscope::Error `f` throws; kInternal when it throws none.
inline ErrorKind kind_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.kind();
  }
  return ErrorKind::kInternal;
}

}  // namespace kvscope::tests
