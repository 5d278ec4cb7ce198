// Repro files of failed differential checks (docs/verification.md): a
// one-layer trace of the failing layer (so every trace tool reads it), plus a
// /repro group with what to replay and what each side produced:
//   /repro  attrs method, budget, backend, failure (strings), layer, layers,
//           seed (int64: the original layer index and count, which
//           layer-dependent methods such as PyramidKV read)
//     <name> [n] float64 datasets: reference and backend results, for inspection
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kvscope/core/trace_data.hpp"

namespace kvscope::traces {

struct ReproInfo {
  std::string method, budget, backend, failure;
  int layer = 0;   // index of the layer in the original trace
  int layers = 1;  // layers of the original trace
  std::int64_t seed = 0;
};

using ReproArrays = std::vector<std::pair<std::string, std::vector<double>>>;

/// Writes the repro file (overwriting `path`); I/O failures are Error(kIo).
void write_repro(const std::string& path, const TraceMeta& meta, const LayerData& layer, const ReproInfo& info,
                 const ReproArrays& arrays);

/// The /repro group of a trace file, or nullopt for an ordinary trace.
std::optional<ReproInfo> read_repro_info(const std::string& path);

}  // namespace kvscope::traces
