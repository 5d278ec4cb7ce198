#include "kvscope/core/budget.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

#include "kvscope/core/error.hpp"

namespace kvscope {

Budget Budget::parse(std::string_view text) {
  auto bad = [&](const char* why) {
    return Error(ErrorKind::kUsage, "budget '" + std::string(text) + "': " + why);
  };
  if (text.empty()) throw bad("empty");
  const bool percent = text.back() == '%';
  std::string_view num = percent ? text.substr(0, text.size() - 1) : text;
  const bool decimal = percent || num.find_first_of(".eE") != std::string_view::npos;
  if (!decimal) {
    std::int64_t n = 0;
    auto [p, ec] = std::from_chars(num.data(), num.data() + num.size(), n);
    if (ec != std::errc() || p != num.data() + num.size()) throw bad("not an integer token count or a ratio");
    if (n < 0) throw bad("token count must be >= 0");
    // Stored as a double: beyond 2^53 it is inexact, and near 2^63 converting it
    // back is undefined behaviour (found by fuzz_method_spec).
    if (n > (std::int64_t{1} << 53)) throw bad("token count must be <= 2^53");
    return tokens(n);
  }
  double r = 0;
  auto [p, ec] = std::from_chars(num.data(), num.data() + num.size(), r);
  if (ec != std::errc() || p != num.data() + num.size() || !std::isfinite(r))
    throw bad("not a number");
  if (percent) r /= 100.0;
  if (!(r > 0.0 && r <= 1.0)) throw bad("ratio must be in (0, 1] (or (0%, 100%])");
  return ratio(r);
}

std::int64_t Budget::resolve(std::int64_t n) const {
  // A token budget is a cache size, meaningful beyond the prompt: decode-time
  // methods evict only once the cache reaches it. Ratios are of the prompt.
  if (kind == Kind::kTokens) return static_cast<std::int64_t>(value);
  // A tiny epsilon keeps 0.35 * 100 from flooring to 34 through representation error.
  return std::min<std::int64_t>(static_cast<std::int64_t>(std::floor(value * static_cast<double>(n) + 1e-9)), n);
}

std::string Budget::label() const {
  char buf[32];
  if (kind == Kind::kTokens)
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(value));
  else
    std::snprintf(buf, sizeof buf, "%g%%", value * 100.0);
  return buf;
}

std::vector<Budget> Budget::parse_list(std::string_view text) {
  std::vector<Budget> out;
  for (std::size_t at; (at = text.find(',')) != std::string_view::npos; text = text.substr(at + 1))
    out.push_back(parse(text.substr(0, at)));
  out.push_back(parse(text));
  return out;
}

}  // namespace kvscope
