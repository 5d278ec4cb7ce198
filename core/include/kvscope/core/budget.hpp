// Budget: what a method may keep per (layer, kv head), as a token count or a
// ratio of the prompt length. Text form: an integer ("512") is tokens; a
// decimal ("0.5") or percentage ("50%") is a ratio in (0, 1].
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace kvscope {

struct Budget {
  enum class Kind { kTokens, kRatio };
  Kind kind = Kind::kRatio;
  double value = 1.0;

  static Budget tokens(std::int64_t n) { return {Kind::kTokens, static_cast<double>(n)}; }
  static Budget ratio(double r) { return {Kind::kRatio, r}; }
  /// Parses the text form; throws Error(kUsage) naming the bad text.
  static Budget parse(std::string_view text);
  /// A comma-separated list ("50%,128"), each entry as parse().
  static std::vector<Budget> parse_list(std::string_view text);

  /// Tokens per head for a prompt of n tokens: a count as is (a cache size, may
  /// exceed n), a ratio floor(r*n) (kvpress's int(L*(1-cr))).
  std::int64_t resolve(std::int64_t n) const;
  /// Canonical label for tables: "512" or "50%".
  std::string label() const;
};

}  // namespace kvscope
