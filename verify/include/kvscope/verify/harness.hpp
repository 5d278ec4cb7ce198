// The differential harness (DESIGN.md section 4): one layer of a trace through
// the reference and a backend, compared by the rules in compare.hpp with the
// tolerance table of tolerance.hpp. Used by `kvscope verify`, the property
// tests and the fuzzer; a failing case can be written as a repro file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvscope/core/trace_data.hpp"
#include "kvscope/opt/backend.hpp"
#include "kvscope/reference/method.hpp"
#include "kvscope/traces/repro.hpp"
#include "kvscope/verify/compare.hpp"

namespace kvscope::verify {

struct LayerVerdict {
  int layer = 0;
  std::vector<SelectionDiff> heads;  // per kv head: the backend's own plans against the reference's
  NumberDiff keys, values;           // the backend's cache of the reference plans against apply_plan
  NumberDiff outputs;                // decode attention over those caches, every q head
  bool deterministic = true;         // bitwise equal plans, caches and outputs at 1 and N threads
  int threads = 1;                   // N
  std::string failure;               // the first failed check, empty on pass
  /// On failure, what each side produced, for the repro file: decode outputs,
  /// kept tokens per kv head, and the caches when small (<= 1M values).
  traces::ReproArrays evidence;
  bool pass() const { return failure.empty(); }
};

struct VerifyOptions {
  /// Threads of the second (determinism) run; 0 = OpenMP's default.
  int threads = 0;
  /// Decode attention with log(count) added to merged slots' logits.
  bool log_count_bias = false;
};

/// The first-pass state of a layer-coupled method (DynamicKV) on each side,
/// built by observing every layer of the trace before the first verify_layer.
struct LayerCouplings {
  const ref::LayerCoupling* reference = nullptr;
  const opt::BackendCoupling* backend = nullptr;
};

/// Checks one layer. Numbers are compared on the reference's plans (so a tie
/// decided differently cannot hide or fake a numeric error); selections on
/// the backend's own plans. The decode query is the trace's first decode
/// query of every q head (the last prefill query when S = 0).
LayerVerdict verify_layer(const ref::Method& reference, const opt::BackendMethod& backend, const TraceMeta& meta,
                          int layer, const LayerData& data, std::int64_t budget, const VerifyOptions& options = {},
                          const LayerCouplings& couplings = {});

}  // namespace kvscope::verify
