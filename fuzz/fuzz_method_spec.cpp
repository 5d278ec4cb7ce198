// The method-config and budget parsers on arbitrary text, then the registry
// building each method and resolving each budget against a prompt length, as
// replay does before reading data. Only kvscope::Error may come out; a spec
// that parses must round-trip through its canonical text.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "kvscope/core/budget.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/core/method_spec.hpp"
#include "kvscope/reference/registry.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Input: "<methods>\n<budget>\n<prompt length>"; missing parts get defaults.
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const std::size_t nl = text.find('\n');
  const std::string_view methods = text.substr(0, nl);
  std::string_view rest = nl == std::string_view::npos ? std::string_view("50%") : text.substr(nl + 1);
  const std::size_t nl2 = rest.find('\n');
  const std::string_view budget_text = rest.substr(0, nl2);
  std::int64_t prompt = 64;
  if (nl2 != std::string_view::npos) prompt = std::strtoll(std::string(rest.substr(nl2 + 1)).c_str(), nullptr, 10);
  if (prompt < 1 || prompt > (std::int64_t{1} << 21)) prompt = 64;  // ReadLimits::max_prompt

  try {
    for (const kvscope::MethodSpec& spec : kvscope::MethodSpec::parse_list(methods)) {
      const kvscope::MethodSpec again = kvscope::MethodSpec::parse(spec.to_string());
      if (again.family != spec.family || again.preset != spec.preset || again.params != spec.params) std::abort();
      try {
        const auto method = kvscope::ref::make_method(spec);
        const kvscope::Budget budget = kvscope::Budget::parse(budget_text);
        (void)budget.label();
        const std::int64_t tokens = budget.resolve(prompt);
        if (tokens < 0) std::abort();  // a resolved budget is a count
        (void)method->protected_tokens(prompt, tokens);
        (void)method->name();
      } catch (const kvscope::Error&) {
      }
    }
  } catch (const kvscope::Error&) {
  }
  return 0;
}
