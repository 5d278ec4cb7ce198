// Shared state of the CPU benchmark suite (docs/performance.md): the limits
// measured once per process (copy bandwidth, fp32 FMA peak) that every
// benchmark reports its ratio to, and the one synthetic layer every benchmark
// runs on (the shape: 32 q heads, 8 kv heads, d 128, T 8192).
#pragma once

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "kvscope/core/trace_data.hpp"
#include "kvscope/opt/layer_storage.hpp"

namespace kvscope::bench {

/// The layer shape of every benchmark (overridable for quick runs: KVSCOPE_BENCH_T).
struct Shape {
  int layers = 32;
  int layer = 16;  // a middle layer (PyramidKV's budget there is near the mean)
  int q_heads = 32;
  int kv_heads = 8;
  int head_dim = 128;
  std::int64_t tokens = 8192;
};
const Shape& shape();

/// Machine limits measured once, on first use, in this process.
struct Limits {
  double memcpy_Bps = 0;    // std::memcpy of a 256 MiB buffer, one thread; bytes = read + write
  double omp_copy_Bps = 0;  // the same copy split over omp_get_max_threads() threads
  double omp_read_Bps = 0;  // a threaded read-only pass (sum) over 256 MiB
  double copy_Bps = 0;      // max(memcpy, omp copy): the bandwidth bw_ratio divides by
  double peak_flops = 0;    // fp32 FMA peak over all threads (register-resident loop)
  int threads = 0;
  double other_load = 0;    // share of the machine other processes used meanwhile (0 = clean)
};
const Limits& limits();

/// The limits' memory kernels, also timed as the bandwidth/* rows: a copy of
/// n bytes split over the threads (memcpy each), and a threaded read-only
/// pass (a sum of 64-bit words; returns it).
void omp_copy(unsigned char* dst, const unsigned char* src, std::size_t n);
double omp_read(const unsigned char* src, std::size_t n);

/// The benchmark layer: a synthetic trace layer (fp16 values, no decode
/// steps), built once.
struct BenchLayer {
  TraceMeta meta;
  LayerData data;
  double synth_seconds = 0;
  double colsum_seconds = 0;  // method_layer(): the CPU kernel's time for attn_colsum
};
const BenchLayer& bench_layer();
/// bench_layer() plus attn_colsum (so H2O reads recorded sums), computed by
/// the CPU kernel: the reference's O(T^2) double computation would take
/// minutes. Built once, only when a method benchmark runs.
const BenchLayer& method_layer();

/// The benchmark layer packed in `dtype` storage (built once per dtype).
const opt::LayerStorage& layer_storage(DType dtype);

/// Bytes that memory-bound kernels cycle through: 4x the L3 this machine
/// reports (sysconf), at least 128 MiB.
std::size_t dram_footprint();

/// Buffer copies of total size >= dram_footprint(), one used per iteration so
/// that memory-bound kernels read from DRAM.
int rotations(std::size_t bytes_per_copy);

/// fp32 FMA peak of all OpenMP threads, flop/s (bench_peak.cpp).
double measure_peak_flops();

/// Runs the benchmark loop over f(), returning the mean wall seconds per
/// iteration (the same clock Google Benchmark's real time uses).
template <class F>
double timed_loop(benchmark::State& state, F&& f);

/// Machine-wide and own CPU time so far (seconds, all cores), from /proc.
struct CpuTimes {
  double busy = 0, self = 0;
};
CpuTimes cpu_times();
/// Sets the counter other_load: the share of the machine's cores other
/// processes used since `since` (over `wall` seconds). Near 0 = uncontended.
void report_other_load(benchmark::State& state, const CpuTimes& since, double wall);

/// Sets bytes_processed and the common counters: threads and, for
/// memory-bound benchmarks, bw_ratio = (bytes / mean_s) / limits().copy_Bps;
/// when flops > 0, GFLOPs and flop_ratio (over the FMA peak of the threads used).
void report(benchmark::State& state, double mean_s, double bytes_per_iter, double flops_per_iter, bool memory_bound);

/// report(), and for a memory-bound row run at the limits' thread count (the
/// target's rows) also bw_ratio measured in pairs (counters bw_paired,
/// bw_paired_lo, bw_paired_hi): rounds that time the limits' copy (omp_copy of
/// 256 MiB) between two runs of `call` about half a copy long each; per round,
/// the kernel's bytes/s over the copy's. The VM's bandwidth drifts by ~15%
/// between the startup limits and a row minutes later.
void report(benchmark::State& state, double mean_s, double bytes_per_iter, double flops_per_iter, bool memory_bound,
            const std::function<void()>& call);

/// Wall seconds of f() (steady clock).
template <class F>
double seconds(F&& f);

/// slow's time over fast's, measured in pairs: each round times one call of
/// slow between two runs of `fast_calls` calls of fast, and its ratio is
/// slow / the mean fast call of that round. Both sides of a ratio see the
/// same machine, where timings taken in separate rows minutes apart do not
/// (this VM's speed drifts by up to 2x within minutes; docs/performance.md,
/// run 18). The median and range of the rounds' ratios.
struct PairedRatio {
  double median = 0, lo = 0, hi = 0;
  int rounds = 0;
};
template <class Slow, class Fast>
PairedRatio paired_ratio(Slow&& slow, Fast&& fast, int rounds, int fast_calls);

}  // namespace kvscope::bench

#include <algorithm>
#include <chrono>

template <class F>
double kvscope::bench::seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <class F>
double kvscope::bench::timed_loop(benchmark::State& state, F&& f) {
  const CpuTimes c0 = cpu_times();
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) f();
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  report_other_load(state, c0, total);
  return total / static_cast<double>(std::max<benchmark::IterationCount>(1, state.iterations()));
}

template <class Slow, class Fast>
kvscope::bench::PairedRatio kvscope::bench::paired_ratio(Slow&& slow, Fast&& fast, int rounds, int fast_calls) {
  std::vector<double> r;
  const auto fast_mean = [&] {
    const double t = seconds([&] {
      for (int i = 0; i < fast_calls; ++i) fast();
    });
    return t / fast_calls;
  };
  for (int i = 0; i < rounds; ++i) {
    const double before = fast_mean(), t = seconds(slow), after = fast_mean();
    r.push_back(t / (0.5 * (before + after)));
  }
  if (r.empty()) return {};
  std::sort(r.begin(), r.end());
  const std::size_t n = r.size();
  const double median = n % 2 ? r[n / 2] : 0.5 * (r[n / 2 - 1] + r[n / 2]);
  return {median, r.front(), r.back(), rounds};
}
