#include "bench_common.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>

#include <unistd.h>

#include "kvscope/opt/cpu/scores.hpp"
#include "kvscope/opt/layer_storage.hpp"
#include "kvscope/traces/synth.hpp"

namespace kvscope::bench {
namespace {

constexpr std::size_t kCopyBytes = std::size_t{256} << 20;

/// Page-aligned, first-touched by the threads that will use it (OpenMP static split).
struct Buffer {
  std::unique_ptr<unsigned char[]> owner;
  unsigned char* p = nullptr;
  explicit Buffer(std::size_t n) : owner(new unsigned char[n + 4096]) {
    p = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(owner.get()) + 4095) & ~std::uintptr_t{4095});
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < static_cast<std::int64_t>(n); i += 4096) p[i] = static_cast<unsigned char>(i);
    std::memset(p, 1, n);
  }
};

Limits measure_limits() {
  Limits l;
  const CpuTimes c0 = cpu_times();
  const auto t0 = std::chrono::steady_clock::now();
  l.threads = omp_get_max_threads();
  Buffer src(kCopyBytes), dst(kCopyBytes);
  double best_memcpy = 1e30, best_omp = 1e30, best_read = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    best_memcpy = std::min(best_memcpy, seconds([&] { std::memcpy(dst.p, src.p, kCopyBytes); }));
    benchmark::ClobberMemory();
    best_omp = std::min(best_omp, seconds([&] { omp_copy(dst.p, src.p, kCopyBytes); }));
    benchmark::ClobberMemory();
    double sink = 0;
    best_read = std::min(best_read, seconds([&] { sink = omp_read(src.p, kCopyBytes); }));
    benchmark::DoNotOptimize(sink);
  }
  l.memcpy_Bps = 2.0 * kCopyBytes / best_memcpy;
  l.omp_copy_Bps = 2.0 * kCopyBytes / best_omp;
  l.omp_read_Bps = 1.0 * kCopyBytes / best_read;
  l.copy_Bps = std::max(l.memcpy_Bps, l.omp_copy_Bps);
  l.peak_flops = measure_peak_flops();
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const CpuTimes c1 = cpu_times();
  const double cores = static_cast<double>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
  l.other_load = std::max(0.0, (c1.busy - c0.busy) - (c1.self - c0.self)) / (wall * cores);
  return l;
}

BenchLayer build_layer() {
  const Shape& s = shape();
  traces::SynthConfig c;
  c.layers = s.layers;
  c.q_heads = s.q_heads;
  c.kv_heads = s.kv_heads;
  c.head_dim = s.head_dim;
  c.prompt = s.tokens;
  c.decode = 0;
  c.dtype = DType::kF16;
  c.record_outputs = false;
  c.record_colsum = false;  // method_layer() computes it with the fp32 kernel
  BenchLayer b;
  b.synth_seconds = seconds([&] {
    b.meta = traces::synth_meta(c);
    b.data = traces::synth_layer(c, s.layer);
  });
  return b;
}

}  // namespace

void omp_copy(unsigned char* dst, const unsigned char* src, std::size_t n) {
#pragma omp parallel
  {
    const auto t = static_cast<std::size_t>(omp_get_thread_num()), nt = static_cast<std::size_t>(omp_get_num_threads());
    const std::size_t chunk = (n / nt + 4095) & ~std::size_t{4095}, lo = std::min(n, t * chunk),
                      hi = std::min(n, lo + chunk);
    std::memcpy(dst + lo, src + lo, hi - lo);
  }
}

// Built for the widest vectors the machine has (the bench is built for
// generic x86-64): a thread's loads must keep enough cache lines in flight.
// The portable build's scalar loop read ~13 GB/s on the Intel VM of run 17,
// where wide loads read ~30 GB/s.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
double omp_read(const unsigned char* src, std::size_t n) {
  const auto* x = reinterpret_cast<const std::uint64_t*>(src);
  const auto words = static_cast<std::int64_t>(n / 8);
  std::uint64_t acc = 0;
#pragma omp parallel for schedule(static) reduction(+ : acc)
  for (std::int64_t i = 0; i < words; ++i) acc += x[i];
  return static_cast<double>(acc);
}

const Shape& shape() {
  static const Shape s = [] {
    Shape x;
    if (const char* t = std::getenv("KVSCOPE_BENCH_T")) x.tokens = std::max<std::int64_t>(64, std::atoll(t));
    return x;
  }();
  return s;
}

const Limits& limits() {
  static const Limits l = measure_limits();
  return l;
}

const BenchLayer& bench_layer() {
  static const BenchLayer b = build_layer();
  return b;
}

const BenchLayer& method_layer() {
  static const BenchLayer b = [] {
    BenchLayer x = bench_layer();
    const Shape& s = shape();
    const opt::LayerStorage& st = layer_storage(DType::kF16);
    Tensor colsum({s.q_heads, s.tokens});
    x.colsum_seconds = seconds([&] {
      opt::cpu::accumulated_attention(st.shape, st.q.data<opt::cpu::f16>(), st.k.data<opt::cpu::f16>(), false,
                                      colsum.data.data());
    });
    x.data.attn_colsum = std::move(colsum);
    x.meta.has_attn_colsum = true;
    return x;
  }();
  return b;
}

CpuTimes cpu_times() {
  CpuTimes t;
  const double tick = static_cast<double>(sysconf(_SC_CLK_TCK));
  if (std::FILE* f = std::fopen("/proc/stat", "r")) {
    unsigned long long v[8] = {};  // user nice system idle iowait irq softirq steal
    if (std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
                    &v[7]) == 8)
      t.busy = static_cast<double>(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / tick;
    std::fclose(f);
  }
  if (std::FILE* f = std::fopen("/proc/self/stat", "r")) {
    // Fields 14 and 15 (utime, stime) follow the parenthesised command name.
    char buf[1024] = {};
    const std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    if (const char* p = std::strrchr(buf, ')')) {
      unsigned long long ut = 0, st = 0;
      if (std::sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) == 2)
        t.self = static_cast<double>(ut + st) / tick;
    }
    std::fclose(f);
  }
  return t;
}

void report_other_load(benchmark::State& state, const CpuTimes& since, double wall) {
  const CpuTimes now = cpu_times();
  const double cores = static_cast<double>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
  const double other = (now.busy - since.busy) - (now.self - since.self);
  state.counters["other_load"] = wall > 0 ? std::max(0.0, other) / (wall * cores) : 0.0;
}

const opt::LayerStorage& layer_storage(DType dtype) {
  static std::map<DType, std::unique_ptr<opt::LayerStorage>> cache;
  auto& slot = cache[dtype];
  if (!slot) {
    const BenchLayer& b = bench_layer();
    static std::map<DType, TraceMeta> metas;  // LayerStorage keeps a pointer to its meta
    TraceMeta& m = metas[dtype];
    m = b.meta;
    m.dtype = dtype;
    slot = std::make_unique<opt::LayerStorage>(opt::pack_layer(m, shape().layer, b.data));
  }
  return *slot;
}

std::size_t dram_footprint() {
  // 4x the L3 this machine reports, at least 128 MiB: a fixed 128 MiB was 4x
  // the 32 MiB L3 of the AMD VM of runs 1-11 but fits the 300 MiB L3 of the
  // Intel VM of run 12.
  static const std::size_t bytes = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return std::max(std::size_t{128} << 20, l3 > 0 ? 4 * static_cast<std::size_t>(l3) : std::size_t{0});
  }();
  return bytes;
}

int rotations(std::size_t bytes_per_copy) {
  const std::size_t footprint = dram_footprint();
  return static_cast<int>(std::max<std::size_t>(1, (footprint + bytes_per_copy - 1) / bytes_per_copy));
}

void report(benchmark::State& state, double mean_s, double bytes_per_iter, double flops_per_iter, bool memory_bound) {
  const Limits& l = limits();
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes_per_iter * static_cast<double>(state.iterations())));
  state.counters["threads"] = omp_get_max_threads();
  if (memory_bound && bytes_per_iter > 0) state.counters["bw_ratio"] = bytes_per_iter / mean_s / l.copy_Bps;
  if (flops_per_iter > 0) {
    // Against the peak of the threads this run uses (peak scales with cores).
    const double peak = l.peak_flops / l.threads * omp_get_max_threads();
    state.counters["GFLOPs"] = flops_per_iter / mean_s / 1e9;
    state.counters["flop_ratio"] = flops_per_iter / mean_s / peak;
  }
}

void report(benchmark::State& state, double mean_s, double bytes_per_iter, double flops_per_iter, bool memory_bound,
            const std::function<void()>& call) {
  report(state, mean_s, bytes_per_iter, flops_per_iter, memory_bound);
  if (!memory_bound || bytes_per_iter <= 0 || mean_s <= 0 || omp_get_max_threads() != limits().threads) return;
  static Buffer src(kCopyBytes), dst(kCopyBytes);
  const auto copy = [&] {
    omp_copy(dst.p, src.p, kCopyBytes);
    benchmark::ClobberMemory();
  };
  const double copy_s = seconds(copy);
  const int calls = std::clamp(static_cast<int>(0.5 * copy_s / mean_s), 1, 256);
  // The rounds' copy time over the mean call, times bytes per call over bytes per copy.
  const PairedRatio p = paired_ratio(copy, call, 9, calls);
  const double scale = bytes_per_iter / (2.0 * static_cast<double>(kCopyBytes));
  state.counters["bw_paired"] = p.median * scale;
  state.counters["bw_paired_lo"] = p.lo * scale;
  state.counters["bw_paired_hi"] = p.hi * scale;
}

}  // namespace kvscope::bench
