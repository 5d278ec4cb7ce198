#include "kvscope/core/plan.hpp"

#include <algorithm>
#include <numeric>

#include "kvscope/core/error.hpp"

namespace kvscope {

void Plan::add_kept(std::int64_t j) {
  token.push_back(j);
  coef_k.push_back(1.0);
  coef_v.push_back(1.0);
  row_ptr.push_back(static_cast<std::int64_t>(token.size()));
  position.push_back(positions == PositionMode::kRerotated ? slots() - 1 : j);
  count.push_back(1);
}

void Plan::add_row(std::span<const std::int64_t> tokens, std::span<const double> ck,
                   std::span<const double> cv, std::int64_t pos, std::int64_t cnt) {
  if (tokens.size() != ck.size() || tokens.size() != cv.size())
    throw Error(ErrorKind::kInternal, "Plan::add_row: entry arrays differ in length");
  token.insert(token.end(), tokens.begin(), tokens.end());
  coef_k.insert(coef_k.end(), ck.begin(), ck.end());
  coef_v.insert(coef_v.end(), cv.begin(), cv.end());
  row_ptr.push_back(static_cast<std::int64_t>(token.size()));
  position.push_back(pos);
  count.push_back(cnt);
}

Plan Plan::identity(std::int64_t n) {
  std::vector<std::int64_t> all(static_cast<std::size_t>(std::max<std::int64_t>(n, 0)));
  std::iota(all.begin(), all.end(), std::int64_t{0});
  return keep(n, all);
}

Plan Plan::keep(std::int64_t n, std::span<const std::int64_t> kept) {
  return keep(n, std::vector<std::int64_t>(kept.begin(), kept.end()));
}

namespace {

/// The first m elements of a thread's cached array of 1s (or of 0, 1, 2, ...
/// with kIota), grown on demand. A one-hot plan's coefficients, counts and
/// row pointers are copied from it: the copy is a memmove, which picks the
/// machine's widest stores at run time, where a fill loop in this portably
/// built library stores sixteen bytes at a time.
template <class T, bool kIota = false>
std::span<const T> constant_prefix(std::size_t m) {
  thread_local std::vector<T> cache;
  if (cache.size() < m) {
    const std::size_t from = cache.size();
    cache.resize(std::max(m, 2 * from));
    if constexpr (kIota)
      std::iota(cache.begin() + static_cast<std::ptrdiff_t>(from), cache.end(), static_cast<T>(from));
    else
      std::fill(cache.begin() + static_cast<std::ptrdiff_t>(from), cache.end(), T{1});
  }
  return {cache.data(), m};
}

}  // namespace

Plan Plan::keep(std::int64_t n, std::vector<std::int64_t>&& kept) {
  // The order check as one branch-free pass (a branch per index was a
  // quarter of the time).
  std::int64_t prev = -1;
  bool bad = false;
  for (std::int64_t j : kept) bad |= j <= prev, prev = j;
  if (bad || prev >= n) throw Error(ErrorKind::kInternal, "Plan::keep: kept indices must be increasing and < n");
  // add_kept for every index, in bulk: the selection methods build thousands
  // of one-hot slots per head, and one push_back each was a hot spot.
  const std::size_t m = kept.size();
  const std::span<const double> ones = constant_prefix<double>(m);
  const std::span<const std::int64_t> counts = constant_prefix<std::int64_t>(m);
  const std::span<const std::int64_t> slots = constant_prefix<std::int64_t, true>(m + 1);
  Plan p;
  p.n = n;
  p.token = std::move(kept);
  p.coef_k.assign(ones.begin(), ones.end());
  p.coef_v.assign(ones.begin(), ones.end());
  p.row_ptr.assign(slots.begin(), slots.end());
  p.position = p.token;  // kOriginal positions: each slot keeps its token's
  p.count.assign(counts.begin(), counts.end());
  return p;
}

Plan compose(const Plan& outer, const Plan& inner) {
  if (outer.n != inner.slots())
    throw Error(ErrorKind::kInternal, "compose: outer plan does not range over inner slots");
  Plan out;
  out.n = inner.n;
  out.positions = outer.positions == PositionMode::kRerotated ? PositionMode::kRerotated
                                                              : inner.positions;
  std::vector<std::int64_t> toks;
  std::vector<double> ck, cv;
  for (std::int64_t i = 0; i < outer.slots(); ++i) {
    toks.clear();
    ck.clear();
    cv.clear();
    std::int64_t cnt = 0;
    for (std::int64_t e = outer.row_begin(i); e < outer.row_end(i); ++e) {
      const std::int64_t s = outer.token[static_cast<std::size_t>(e)];
      cnt += inner.count[static_cast<std::size_t>(s)];
      for (std::int64_t f = inner.row_begin(s); f < inner.row_end(s); ++f) {
        const auto fu = static_cast<std::size_t>(f);
        toks.push_back(inner.token[fu]);
        ck.push_back(outer.coef_k[static_cast<std::size_t>(e)] * inner.coef_k[fu]);
        cv.push_back(outer.coef_v[static_cast<std::size_t>(e)] * inner.coef_v[fu]);
      }
    }
    // Merge duplicate tokens so each (slot, token) appears once, sorted by token.
    std::vector<std::size_t> order(toks.size());
    for (std::size_t k = 0; k < order.size(); ++k) order[k] = k;
    std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return toks[a] < toks[b]; });
    std::vector<std::int64_t> mt;
    std::vector<double> mk, mv;
    for (std::size_t k : order) {
      if (!mt.empty() && mt.back() == toks[k]) {
        mk.back() += ck[k];
        mv.back() += cv[k];
      } else {
        mt.push_back(toks[k]);
        mk.push_back(ck[k]);
        mv.push_back(cv[k]);
      }
    }
    std::int64_t pos = 0;
    if (outer.positions == PositionMode::kRerotated) {
      pos = outer.position[static_cast<std::size_t>(i)];
    } else if (outer.row_end(i) > outer.row_begin(i)) {
      const std::int64_t s = outer.token[static_cast<std::size_t>(outer.row_begin(i))];
      pos = inner.position[static_cast<std::size_t>(s)];
      // A slot whose outer row is a single one-hot entry keeps the inner position
      // exactly; merged rows take the position the outer plan assigned.
      if (outer.row_end(i) - outer.row_begin(i) > 1) pos = outer.position[static_cast<std::size_t>(i)];
    }
    out.add_row(mt, mk, mv, pos, cnt);
  }
  return out;
}

void append_token(Plan& plan) {
  const std::int64_t j = plan.n;
  plan.n += 1;
  plan.add_kept(j);
}

std::vector<std::int64_t> evicted_tokens(const Plan& plan) {
  std::vector<char> seen(static_cast<std::size_t>(plan.n), 0);
  for (std::int64_t t : plan.token) seen[static_cast<std::size_t>(t)] = 1;
  std::vector<std::int64_t> out;
  for (std::int64_t j = 0; j < plan.n; ++j)
    if (!seen[static_cast<std::size_t>(j)]) out.push_back(j);
  return out;
}

}  // namespace kvscope
