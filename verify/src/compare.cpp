#include "kvscope/verify/compare.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace kvscope::verify {
namespace {

constexpr double kScoreUnderflow = 1e-30;

std::vector<char> kept_mask(const Plan& p) {
  std::vector<char> m(static_cast<std::size_t>(p.n), 0);
  for (std::int64_t t : p.token) m[static_cast<std::size_t>(t)] = 1;
  return m;
}

/// A slot in canonical form: entries sorted by token.
struct CanonicalSlot {
  std::vector<std::int64_t> tokens;
  std::vector<double> ck, cv;
  std::int64_t position = 0, count = 0;
  bool operator<(const CanonicalSlot& o) const {
    return tokens != o.tokens ? tokens < o.tokens : position != o.position ? position < o.position : count < o.count;
  }
  bool same_place(const CanonicalSlot& o) const { return tokens == o.tokens && position == o.position && count == o.count; }
};

std::vector<CanonicalSlot> canonical_slots(const Plan& p) {
  std::vector<CanonicalSlot> out(static_cast<std::size_t>(p.slots()));
  for (std::int64_t i = 0; i < p.slots(); ++i) {
    std::vector<std::int64_t> order;
    for (std::int64_t e = p.row_begin(i); e < p.row_end(i); ++e) order.push_back(e);
    std::sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
      return p.token[static_cast<std::size_t>(a)] < p.token[static_cast<std::size_t>(b)];
    });
    CanonicalSlot& c = out[static_cast<std::size_t>(i)];
    for (std::int64_t e : order) {
      c.tokens.push_back(p.token[static_cast<std::size_t>(e)]);
      c.ck.push_back(p.coef_k[static_cast<std::size_t>(e)]);
      c.cv.push_back(p.coef_v[static_cast<std::size_t>(e)]);
    }
    c.position = p.position[static_cast<std::size_t>(i)];
    c.count = p.count[static_cast<std::size_t>(i)];
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool close_coefficients(const std::vector<double>& a, const std::vector<double>& b) {
  double total = 0;
  for (double x : a) total += std::abs(x);
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(std::abs(a[i] - b[i]) <= kCoefficientTolerance * total)) return false;
  return true;
}

/// Tokens whose slot (canonical form, coefficients within tolerance) differs
/// between the plans; 0 when the plans agree slot for slot. `reweighted`
/// receives those of them in slots both plans have, with other coefficients.
std::int64_t tokens_in_differing_slots(const Plan& ref, const Plan& opt, std::int64_t& reweighted) {
  reweighted = 0;
  const std::vector<CanonicalSlot> a = canonical_slots(ref), b = canonical_slots(opt);
  std::vector<char> differs(static_cast<std::size_t>(ref.n), 0);
  std::size_t i = 0, j = 0;
  const auto mark = [&](const CanonicalSlot& s) {
    for (std::int64_t t : s.tokens) differs[static_cast<std::size_t>(t)] = 1;
  };
  while (i < a.size() || j < b.size()) {
    if (j == b.size() || (i < a.size() && a[i] < b[j])) {
      mark(a[i++]);
    } else if (i == a.size() || b[j] < a[i]) {
      mark(b[j++]);
    } else {  // same place
      if (!close_coefficients(a[i].ck, b[j].ck) || !close_coefficients(a[i].cv, b[j].cv)) {
        mark(a[i]);
        reweighted += static_cast<std::int64_t>(a[i].tokens.size());
      }
      ++i, ++j;
    }
  }
  return std::count(differs.begin(), differs.end(), 1);
}

}  // namespace

SelectionDiff compare_selection(const Plan& ref, const Plan& opt, const ref::VecX* ref_scores,
                                std::span<const char> is_protected, double delta, double decision_margin,
                                bool reweights_follow_decisions) {
  SelectionDiff d;
  d.plans_equal = ref == opt;
  const std::vector<char> a = kept_mask(ref), b = kept_mask(opt);
  if (ref.n != opt.n) {
    d.mismatches = 1;
    d.first_mismatch = "plans range over " + std::to_string(ref.n) + " and " + std::to_string(opt.n) + " tokens";
    return d;
  }
  const auto prot = [&](std::int64_t j) { return !is_protected.empty() && is_protected[static_cast<std::size_t>(j)]; };
  // The reference's decision boundary over the candidates.
  double min_kept = std::numeric_limits<double>::infinity(), max_evicted = -min_kept, scale = 0;
  if (ref_scores)
    for (std::int64_t j = 0; j < ref.n; ++j) {
      if (prot(j)) continue;
      const double s = (*ref_scores)[j];
      scale = std::max(scale, std::abs(s));
      if (a[static_cast<std::size_t>(j)])
        min_kept = std::min(min_kept, s);
      else
        max_evicted = std::max(max_evicted, s);
    }
  // Absolute part: fp32 cannot tell scores apart below its underflow range
  // (a saturated softmax, squares of tiny keys), so those are ties too.
  const double slack = delta * scale + kScoreUnderflow;
  std::int64_t both = 0, either = 0;
  for (std::int64_t j = 0; j < ref.n; ++j) {
    const bool in_a = a[static_cast<std::size_t>(j)], in_b = b[static_cast<std::size_t>(j)];
    d.kept_ref += in_a;
    d.kept_opt += in_b;
    both += in_a && in_b;
    either += in_a || in_b;
    if (in_a == in_b) continue;
    bool tie = false;
    if (ref_scores && !prot(j)) {
      const double s = (*ref_scores)[j];
      // Kept by the backend only: it must score within the margin of the lowest kept;
      // dropped by the backend only: within the margin of the highest evicted.
      tie = in_b ? s >= min_kept - slack : s <= max_evicted + slack;
    }
    // Evict-then-merge methods (EMS, CaM): a token kept by one side only
    // follows from a chained decision; inside the margin it is a tie too.
    if (decision_margin <= delta) tie = true;
    if (tie) {
      ++d.ties;
    } else {
      if (d.mismatches == 0)
        d.first_mismatch = "token " + std::to_string(j) + (in_a ? " kept by the reference only" : " kept by the backend only") +
                           (ref_scores && !prot(j) ? " (reference score " + std::to_string((*ref_scores)[j]) +
                                                         ", boundary [" + std::to_string(max_evicted) + ", " +
                                                         std::to_string(min_kept) + "])"
                                                   : "");
      ++d.mismatches;
    }
  }
  d.jaccard = either > 0 ? 1.0 - static_cast<double>(both) / static_cast<double>(either) : 0.0;
  // Same kept sets but different rows (merges, positions): a mismatch unless
  // the difference comes from decisions already counted as ties, the rows
  // agree up to fp32 merge weights, or a chained merge decision of the
  // reference lay inside the margin (then every token in a differing slot is a tie).
  if (!d.plans_equal && d.ties == 0 && d.mismatches == 0 && ref.positions == opt.positions) {
    std::int64_t reweighted = 0;
    const std::int64_t differing = tokens_in_differing_slots(ref, opt, reweighted);
    // A flipped decision moves slot boundaries, positions or counts; the same
    // slot with other weights is a weight error whatever the margin, unless
    // the method's weights depend on its decision order (WeightedKV).
    if (differing > 0 && (reweighted == 0 || reweights_follow_decisions) && decision_margin <= delta) {
      d.ties = differing;
    } else if (differing > 0) {
      d.mismatches = 1;
      d.first_mismatch = std::to_string(differing) +
                         " tokens in slots that differ (tokens, position, count or coefficients beyond " +
                         std::to_string(kCoefficientTolerance) + " of the slot weight); decision margin " +
                         std::to_string(decision_margin);
    }
  } else if (!d.plans_equal && d.ties == 0 && d.mismatches == 0) {
    d.mismatches = 1;
    d.first_mismatch = "same kept tokens but different slots (coefficients, positions or counts)";
  }
  return d;
}

NumberDiff compare_numbers(std::span<const double> ref, std::span<const float> opt, std::span<const double> naive,
                           const Tolerance& tol) {
  NumberDiff d;
  d.count = static_cast<std::int64_t>(ref.size());
  double diff2 = 0, ref2 = 0, opt2 = 0, dot = 0, naive2 = 0, naive_sq = 0, naive_dot = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double o = static_cast<double>(opt[i]);
    if (!std::isfinite(o)) {
      ++d.non_finite;
      continue;
    }
    diff2 += (o - ref[i]) * (o - ref[i]);
    ref2 += ref[i] * ref[i];
    opt2 += o * o;
    dot += o * ref[i];
    naive2 += (naive[i] - ref[i]) * (naive[i] - ref[i]);
    naive_sq += naive[i] * naive[i];
    naive_dot += naive[i] * ref[i];
  }
  const auto cosine = [](double xy, double xx, double yy) {
    return xx > 0 && yy > 0 ? xy / std::sqrt(xx * yy) : (xx == yy ? 1.0 : 0.0);
  };
  const double norm = std::sqrt(ref2);
  d.rel_l2 = norm > 0 ? std::sqrt(diff2) / norm : std::sqrt(diff2);
  d.naive_rel_l2 = norm > 0 ? std::sqrt(naive2) / norm : std::sqrt(naive2);
  d.cosine = cosine(dot, ref2, opt2);
  d.bound = tol.k * d.naive_rel_l2 + tol.floor;
  // Values the storage dtype cannot hold (below its least subnormal, say)
  // leave even the reference rounded to it outside the dtype's tolerance:
  // such a tensor is held to k * naive + floor, and its cosine to the naive
  // one's, alone. Any other is held to the tolerance as well.
  const bool representable = d.naive_rel_l2 <= tol.rel_l2;
  const double naive_cosine = cosine(naive_dot, ref2, naive_sq);
  const double cosine_min = representable ? tol.cosine_min : std::min(tol.cosine_min, naive_cosine - tol.floor);
  if (d.non_finite > 0)
    d.why = std::to_string(d.non_finite) + " non-finite values (unwritten or overflowed)";
  else if (representable && d.rel_l2 > tol.rel_l2)
    d.why = "rel-L2 " + std::to_string(d.rel_l2) + " > tolerance " + std::to_string(tol.rel_l2);
  else if (d.rel_l2 > d.bound)
    d.why = "rel-L2 " + std::to_string(d.rel_l2) + " > k*naive+floor " + std::to_string(d.bound);
  else if (d.cosine < cosine_min)
    d.why = "cosine " + std::to_string(d.cosine) + " < " + std::to_string(cosine_min);
  d.pass = d.why.empty();
  return d;
}

}  // namespace kvscope::verify
