#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>

#include "commands.hpp"
#include "kvscope/traces/trace_io.hpp"

namespace kvscope::cli {
namespace {

double mean_row_norm(const Tensor& t) {
  if (t.size() == 0) return 0;
  double sum = 0;
  const std::int64_t rows = t.dim(0) * t.dim(1), d = t.dim(2);
  for (std::int64_t r = 0; r < rows; ++r) {
    double s = 0;
    for (std::int64_t i = 0; i < d; ++i) s += double(t.data[static_cast<std::size_t>(r * d + i)]) * t.data[static_cast<std::size_t>(r * d + i)];
    sum += std::sqrt(s);
  }
  return sum / static_cast<double>(rows);
}

void inspect(const std::string& path, bool metadata_only) {
  const traces::TraceReader trace(path);
  const TraceMeta& m = trace.meta();
  std::printf("%s: valid kvscope trace (schema v1)\n", path.c_str());
  std::printf("  model %s (producer %s)\n", m.model.c_str(), m.producer.c_str());
  std::printf("  layers %d, q heads %d, kv heads %d (GQA group %d), head dim %d\n", m.layers, m.q_heads, m.kv_heads,
              m.group_size(), m.head_dim);
  std::printf("  prompt %lld tokens, decode %lld steps, dtype %s\n", static_cast<long long>(m.prompt_len),
              static_cast<long long>(m.decode_steps), dtype_name(m.dtype));
  std::printf("  rope theta %g, scaling %s, style %s, keys %s\n", m.rope_theta, m.rope_scaling.c_str(),
              m.rope_style.c_str(), m.keys_post_rope ? "post-RoPE" : "pre-RoPE");
  std::printf("  recorded decode outputs: %s; accumulated prefill attention: %s\n",
              m.has_decode_outputs ? "yes" : "no", m.has_attn_colsum ? "yes" : "no");
  if (metadata_only) return;
  std::printf("  %5s %12s %12s %12s   (mean row L2 norm over heads and tokens)\n", "layer", "q", "k", "v");
  for (int l = 0; l < m.layers; ++l) {
    const LayerData d = trace.read_layer(l);  // reads and checks every value
    std::printf("  %5d %12.4f %12.4f %12.4f\n", l, mean_row_norm(d.prefill_q), mean_row_norm(d.prefill_k),
                mean_row_norm(d.prefill_v));
  }
  std::printf("  all data read: no NaN or Inf\n");
}

}  // namespace

void add_inspect(CLI::App& app, Runner& run) {
  auto path = std::make_shared<std::string>();
  auto quick = std::make_shared<bool>(false);
  CLI::App* c = app.add_subcommand("inspect", "Validate a trace and summarise it");
  c->add_option("trace", *path, "trace file")->required();
  c->add_flag("--metadata-only", *quick, "validate the schema only, do not read the data");
  c->callback([&run, path, quick] { run = [path, quick] { inspect(*path, *quick); }; });
}

}  // namespace kvscope::cli
