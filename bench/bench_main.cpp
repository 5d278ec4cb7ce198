// kvscope_bench_cpu: the CPU backend's kernels and method prefills against the
// machine's measured limits and the double-precision reference
// (docs/performance.md). `make bench` builds and runs it.
#include <omp.h>

#include <cstdio>
#include <string>

#include "bench_common.hpp"
#include "bench_register.hpp"
#include "kvscope/core/heap.hpp"

namespace {

std::string fmt(double x, int digits = 2) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, x);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace kvscope::bench;
  // As the CLI does: every prefill's plans (reference and backend alike) reuse
  // freed heap instead of faulting in fresh pages.
  const bool kept = kvscope::keep_freed_heap_memory();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  // Measured once, before any benchmark, in this process: every ratio divides by these.
  const Limits& l = limits();
  const Shape& s = shape();
  benchmark::AddCustomContext("kvscope_omp_threads", std::to_string(l.threads));
  benchmark::AddCustomContext("kvscope_memcpy_GBps", fmt(l.memcpy_Bps / 1e9));
  benchmark::AddCustomContext("kvscope_omp_copy_GBps", fmt(l.omp_copy_Bps / 1e9));
  benchmark::AddCustomContext("kvscope_omp_read_GBps", fmt(l.omp_read_Bps / 1e9));
  benchmark::AddCustomContext("kvscope_copy_GBps (bw_ratio = 1)", fmt(l.copy_Bps / 1e9));
  benchmark::AddCustomContext("kvscope_fp32_fma_peak_GFLOPs", fmt(l.peak_flops / 1e9, 1));
  benchmark::AddCustomContext("kvscope_limits_other_load (> 0.05: contended, rerun)", fmt(l.other_load));
  benchmark::AddCustomContext("kvscope_keep_freed_heap", kept ? "yes" : "no");
  benchmark::AddCustomContext("kvscope_dram_footprint_MiB", std::to_string(dram_footprint() >> 20));
  benchmark::AddCustomContext("kvscope_layer", "q_heads " + std::to_string(s.q_heads) + ", kv_heads " +
                                                   std::to_string(s.kv_heads) + ", d " + std::to_string(s.head_dim) +
                                                   ", T " + std::to_string(s.tokens) + ", layer " +
                                                   std::to_string(s.layer) + " of " + std::to_string(s.layers));
  const BenchLayer& b = bench_layer();
  benchmark::AddCustomContext("kvscope_synth_layer_s", fmt(b.synth_seconds));

  register_kernel_benchmarks();
  register_merge_kernel_benchmarks();
  register_method_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
