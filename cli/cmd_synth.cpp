#include <iostream>
#include <memory>

#include "commands.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/traces/synth.hpp"

namespace kvscope::cli {
namespace {

struct SynthArgs {
  traces::SynthConfig config;
  std::string out;
  std::string dtype = "float16";
  bool deflate = false;
};

}  // namespace

void add_synth(CLI::App& app, Runner& run) {
  auto a = std::make_shared<SynthArgs>();
  traces::SynthConfig& c = a->config;
  CLI::App* s = app.add_subcommand("synth", "Generate a deterministic synthetic trace (docs/synthetic-traces.md)");
  s->add_option("--out", a->out, "output trace file")->required();
  s->add_option("--layers", c.layers, "layers")->capture_default_str();
  s->add_option("--q-heads", c.q_heads, "query heads")->capture_default_str();
  s->add_option("--kv-heads", c.kv_heads, "key/value heads (divides q-heads)")->capture_default_str();
  s->add_option("--head-dim", c.head_dim, "head dimension (even)")->capture_default_str();
  s->add_option("--prompt", c.prompt, "prompt tokens T")->capture_default_str();
  s->add_option("--decode", c.decode, "decode steps S")->capture_default_str();
  s->add_option("--seed", c.seed, "seed; the same seed gives the same bits")->capture_default_str();
  s->add_option("--dtype", a->dtype, "storage dtype: float32, float16, bfloat16")->capture_default_str();
  s->add_flag("--deflate", a->deflate, "shuffle + deflate the datasets");
  // attn_colsum costs O(T^2 d) per q head: skip it for long synthetic traces.
  s->add_flag("!--no-colsum", c.record_colsum, "do not record prefill/attn_colsum (quadratic in the prompt)");
  s->add_flag("!--no-outputs", c.record_outputs, "do not record decode/o");
  s->callback([&run, a] {
    run = [a] {
      const auto dtype = parse_dtype(a->dtype);
      if (!dtype) throw Error(ErrorKind::kUsage, "--dtype '" + a->dtype + "': expected float32, float16 or bfloat16");
      a->config.dtype = *dtype;
      traces::validate(a->config);
      traces::WriteOptions w;
      w.deflate = a->deflate;
      traces::synth_to_file(a->config, a->out, w);
      std::cout << "wrote " << a->out << "\n";
    };
  });
}

}  // namespace kvscope::cli
