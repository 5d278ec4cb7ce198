// How shared decision code runs its independent per-layer or per-head steps: a
// reference calls them in turn, a backend hands in its threads. One type for
// every such hook.
#pragma once

#include <functional>

namespace kvscope {

/// Runs body(i) for every i in [0, n), in any order and possibly at once.
/// Bodies that throw: the runner rethrows the first in index order (as a loop
/// in turn would), after every body has run.
using ForEachIndex = std::function<void(int n, const std::function<void(int)>& body)>;

/// body(0), body(1), ... body(n - 1): what an empty ForEachIndex means.
inline void for_each_in_turn(int n, const std::function<void(int)>& body) {
  for (int i = 0; i < n; ++i) body(i);
}

/// `f`, or for_each_in_turn when `f` is empty.
inline ForEachIndex or_in_turn(const ForEachIndex& f) { return f ? f : ForEachIndex(for_each_in_turn); }

}  // namespace kvscope
