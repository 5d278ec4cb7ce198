// Synthetic traces: a deterministic generative model (docs/synthetic-traces.md)
// with the structure real models show and the compression methods depend on:
// RoPE-rotated keys with strong adjacent-key similarity, attention sinks,
// heavy-hitter tokens, GQA, and a planted needle that later queries retrieve.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvscope/core/trace_data.hpp"
#include "kvscope/traces/trace_io.hpp"

namespace kvscope::traces {

struct SynthConfig {
  int layers = 4;
  int q_heads = 8;
  int kv_heads = 2;
  int head_dim = 64;
  std::int64_t prompt = 512;
  std::int64_t decode = 32;
  std::uint64_t seed = 1;
  DType dtype = DType::kF16;
  double rope_theta = 10000.0;
  bool record_outputs = true;   // decode/o from full-cache attention of the generated q/k/v
  bool record_colsum = true;    // prefill/attn_colsum

  // Structure knobs (docs/synthetic-traces.md). A *_logit is the extra
  // pre-softmax score a query of a fully focused head gives the planted token.
  int sinks = 1;                     // attention-sink tokens at positions 0..sinks-1
  double sink_logit = 8.0;
  double heavy_fraction = 0.02;      // probability that a token (not sink/needle) is a heavy hitter
  double heavy_logit = 4.0;
  double local_logit = 2.5;          // score for keys sharing the query's latent (locality/recency)
  double key_rho = 0.95;             // AR(1) correlation of adjacent keys' latent (per-head jitter)
  double segment_break = 1.0 / 32;   // per-token probability that the latent restarts
  double lowfreq_tilt = 4.0;         // RoPE pair i gets energy ~ exp(-tilt (1 - i/(d/2-1)))
  double early_layer_focus = 0.4;    // logit scale of layer 0, ramping to 1 by layer layers/8
  bool needle = true;                // plant a needle that retrieval heads retrieve
  double needle_depth = 0.5;         // needle position as a fraction of the prompt
  double needle_logit = 14.0;
  int retrieval_heads = 1;           // q heads per layer whose late queries retrieve the needle
  std::int64_t question_len = 16;    // trailing prompt tokens whose retrieval queries do too
};

/// Where the generator planted its structure: ground truth for tests and analysis.
struct SynthPlanted {
  std::vector<std::int64_t> sinks;   // positions 0..sinks-1
  std::vector<std::int64_t> heavy;   // positions in 0..T+S-1, the same in every layer and head
  std::int64_t needle = -1;          // prompt position, -1 when none
  std::vector<int> retrieval_heads;  // q heads of this layer, ascending
};

/// Throws Error(kUsage) naming the bad field (q_heads not a multiple of kv_heads, odd head_dim...).
void validate(const SynthConfig& config);
TraceMeta synth_meta(const SynthConfig& config);
/// Layer `layer` of the trace; depends only on (config, layer), values already
/// rounded to config.dtype, so it equals what a reader returns from the file.
LayerData synth_layer(const SynthConfig& config, int layer);
SynthPlanted synth_planted(const SynthConfig& config, int layer);
/// Generates and writes the whole trace, one layer in memory at a time.
void synth_to_file(const SynthConfig& config, const std::string& path, WriteOptions options = {});

}  // namespace kvscope::traces
