// Plan: the provenance of a compressed cache for one (layer, kv head)
// (DESIGN.md section 1). Slot i of the cache is
//   K'_i = sum_j coef_k[i,j] * K_j      V'_i = sum_j coef_v[i,j] * V_j
// over original tokens j < n, stored in CSR form with one sparsity pattern for
// both coefficient sets (a value-only merge has coef_k = 0 on that entry).
// Eviction rows are one-hot; merge rows carry weights; `count` is how many
// original tokens the slot stands for; `position` is the RoPE position its key
// carries (see PositionMode).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace kvscope {

enum class PositionMode {
  kOriginal,   // keys keep the rotation of their original positions (kvpress, KVCache-Factory)
  kRerotated,  // keys are re-rotated to their slot index (StreamingLLM paper); rows one-hot
};

struct Plan {
  std::int64_t n = 0;                     // original tokens the plan ranges over
  std::vector<std::int64_t> row_ptr{0};   // slots + 1
  std::vector<std::int64_t> token;        // nnz: original token index
  std::vector<double> coef_k;             // nnz
  std::vector<double> coef_v;             // nnz
  std::vector<std::int64_t> position;     // slots
  std::vector<std::int64_t> count;        // slots
  PositionMode positions = PositionMode::kOriginal;

  /// Identical plans: every field, coefficients bit for bit.
  bool operator==(const Plan&) const = default;

  std::int64_t slots() const { return static_cast<std::int64_t>(row_ptr.size()) - 1; }
  std::int64_t nnz() const { return static_cast<std::int64_t>(token.size()); }

  /// Appends a one-hot slot holding original token j unchanged.
  void add_kept(std::int64_t j);
  /// Appends a general slot: entries (token, coef_k, coef_v), its position and count.
  void add_row(std::span<const std::int64_t> tokens, std::span<const double> ck,
               std::span<const double> cv, std::int64_t pos, std::int64_t cnt);
  /// Entries of slot i as index range [begin, end) into token/coef arrays.
  std::int64_t row_begin(std::int64_t i) const { return row_ptr[static_cast<std::size_t>(i)]; }
  std::int64_t row_end(std::int64_t i) const { return row_ptr[static_cast<std::size_t>(i) + 1]; }

  /// Plan keeping every token 0..n-1 in order: the full cache.
  static Plan identity(std::int64_t n);
  /// Plan keeping exactly `kept` (must be increasing) of n tokens, one-hot.
  static Plan keep(std::int64_t n, std::span<const std::int64_t> kept);
  /// The same, taking over `kept`'s storage as the token array (one copy less).
  static Plan keep(std::int64_t n, std::vector<std::int64_t>&& kept);
};

/// outer ∘ inner: `outer` ranges over the slots of `inner` (outer.n == inner.slots()).
/// The result ranges over inner.n; counts are summed, positions taken from outer
/// when it re-rotates and otherwise from the inner slot of the first entry.
Plan compose(const Plan& outer, const Plan& inner);

/// Extends a plan over n tokens to n + 1 by appending a one-hot slot for the new
/// token n (a decode step adding its key and value to the cache).
void append_token(Plan& plan);

/// Original tokens that appear in no slot (evicted), increasing.
std::vector<std::int64_t> evicted_tokens(const Plan& plan);

}  // namespace kvscope
