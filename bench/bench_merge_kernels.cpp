// The merge families' kernels (optimized/cpu merging.hpp, evict_merge.hpp) on
// the benchmark layer: KVMerger's merge-set segmentation and Gaussian weights,
// one block of WeightedKV's streaming attention, and EMS's centre assignment.
// Their weighted sums are apply_ragged_plan rows (bench_kernels.cpp,
// apply_ragged_plan_merge_pairs). Inputs come from the layer's own keys where
// the kernel's cost depends on them (the merge runs follow its adjacent-key
// cosines).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "bench_kernel_util.hpp"
#include "bench_register.hpp"
#include "kvscope/opt/cpu/evict_merge.hpp"
#include "kvscope/opt/cpu/merging.hpp"
#include "kvscope/opt/cpu/select.hpp"

namespace kvscope::bench {
namespace {

/// Share of adjacent-key edges that merge: a run is 4 tokens on average.
constexpr double kMergedEdges = 0.75;

/// KVMerger-like merge runs of every kv head: edge j merges when the layer's
/// cosine of keys j, j + 1 is in the top kMergedEdges of the head's cosines;
/// the pivots follow seeded scores.
struct MergeRuns {
  std::vector<char> merge;                          // [kv_heads, T - 1]
  std::vector<float> score;                         // [kv_heads, T]
  std::vector<std::vector<std::int64_t>> begin, pivot;  // per head, from merge_runs
};

const MergeRuns& merge_runs_of_layer() {
  static const MergeRuns r = [] {
    const Shape& sh = shape();
    const LayerShape s = layer_shape();
    const opt::LayerStorage& st = layer_storage(DType::kF16);
    const std::int64_t T = sh.tokens, edges = T - 1;
    std::vector<float> cos(static_cast<std::size_t>(sh.kv_heads * edges));
    opt::cpu::adjacent_key_cosine(s, st.k.data<f16>(), cos.data());
    MergeRuns m;
    m.merge.resize(cos.size());
    m.score = random_scores(sh.kv_heads * T, 17);
    m.begin.resize(static_cast<std::size_t>(sh.kv_heads));
    m.pivot.resize(m.begin.size());
    for (int h = 0; h < sh.kv_heads; ++h) {
      const float* c = cos.data() + h * edges;
      std::vector<float> sorted(c, c + edges);
      const auto cut = static_cast<std::int64_t>(static_cast<double>(edges) * (1.0 - kMergedEdges));
      std::nth_element(sorted.begin(), sorted.begin() + cut, sorted.end());
      const float threshold = sorted[static_cast<std::size_t>(cut)];
      for (std::int64_t j = 0; j < edges; ++j) m.merge[static_cast<std::size_t>(h * edges + j)] = c[j] >= threshold;
      opt::cpu::merge_runs(T, m.merge.data() + h * edges, m.score.data() + h * T, m.begin[static_cast<std::size_t>(h)],
                           m.pivot[static_cast<std::size_t>(h)]);
    }
    return m;
  }();
  return r;
}

/// merge_runs of every kv head (serial: the caller runs heads on threads).
void BM_merge_runs(benchmark::State& state) {
  const Shape& sh = shape();
  const MergeRuns& m = merge_runs_of_layer();
  const std::int64_t T = sh.tokens;
  std::vector<std::int64_t> begin, pivot;
  std::size_t runs = 0;
  const double t = timed_loop(state, [&] {
    runs = 0;
    for (int h = 0; h < sh.kv_heads; ++h) {
      opt::cpu::merge_runs(T, m.merge.data() + h * (T - 1), m.score.data() + h * T, begin, pivot);
      runs += pivot.size();
      benchmark::DoNotOptimize(pivot.data());
    }
  });
  // flags and scores in; run starts and pivots out
  report(state, t, static_cast<double>(m.merge.size() + m.score.size() * 4 + 16 * runs), 0, false);
  state.counters["threads"] = 1;
  state.counters["runs_per_head"] = static_cast<double>(runs) / sh.kv_heads;
}

/// KVMerger Eq. 4 weights of every run of every kv head (mean-distance sigma):
/// each head's keys read once.
template <class S>
void BM_gaussian_merge_weights(benchmark::State& state) {
  const Threads th(static_cast<int>(state.range(0)));
  const Shape& sh = shape();
  const MergeRuns& m = merge_runs_of_layer();
  const opt::LayerStorage& st = layer_storage(dtype_of<S>());
  const std::int64_t T = sh.tokens, head = T * sh.head_dim;
  const int copies = rotations(kv_elems() * sizeof(S));
  const std::vector<S> k = replicate(st.k.data<S>(), kv_elems(), copies);
  std::vector<float> w(static_cast<std::size_t>(sh.kv_heads * T));
  int c = 0;
  const auto call = [&] {
    for (int h = 0; h < sh.kv_heads; ++h) {
      const auto& b = m.begin[static_cast<std::size_t>(h)];
      const auto& p = m.pivot[static_cast<std::size_t>(h)];
      opt::cpu::gaussian_merge_weights(k.data() + c * kv_elems() + h * head, T, sh.head_dim, b.data(), p.data(),
                                       static_cast<std::int64_t>(p.size()), opt::cpu::SigmaMode::kMeanDistance, 0.0f,
                                       w.data() + h * T);
    }
    benchmark::DoNotOptimize(w.data());
    c = (c + 1) % copies;
  };
  const double t = timed_loop(state, call);
  // K in, one weight per token out; a squared distance per token (3 flops per element)
  report(state, t, static_cast<double>(kv_elems() * sizeof(S) + w.size() * 4), 3.0 * static_cast<double>(kv_elems()),
         true, call);
}

/// The keys one block of WeightedKV's streaming prefill meets at a full
/// cache, per kv head: a seeded half of [0, T - 64) (B = T/2 slots), then the
/// block's own 64 tokens, as token indices (the GEMM reads them in place).
struct BlockKeys {
  static constexpr std::int64_t kBlock = 64;
  std::int64_t B = 0, t0 = 0, n_keys = 0;
  std::vector<std::vector<std::int64_t>> keys;
};

const BlockKeys& block_keys() {
  static const BlockKeys bk = [] {
    const Shape& sh = shape();
    BlockKeys out;
    out.B = sh.tokens / 2, out.t0 = sh.tokens - BlockKeys::kBlock, out.n_keys = out.B + BlockKeys::kBlock;
    std::vector<std::int64_t> order(static_cast<std::size_t>(out.t0));
    std::mt19937_64 rng(19);
    for (int h = 0; h < sh.kv_heads; ++h) {
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng);
      std::vector<std::int64_t> kept(order.begin(), order.begin() + out.B);
      std::sort(kept.begin(), kept.end());
      for (std::int64_t j = out.t0; j < sh.tokens; ++j) kept.push_back(j);
      out.keys.push_back(std::move(kept));
    }
    return out;
  }();
  return bk;
}

/// One block of WeightedKV's streaming prefill at a full cache: 64 prompt
/// queries of every q head against the B = T/2 cached keys plus the block's
/// own (group_block_logits, one GEMM per kv head), then, unless `logits_only`,
/// each query's softmax over its B slots reduced over the group
/// (group_prefix_softmax). kv heads on the threads, as the backend runs them.
/// The prefill runs T/64 such blocks. The logits-only row is the Q.K^T tile
/// every attention-shaped kernel is built on: its flop_ratio is the GEMM's
/// share of the FMA peak.
template <class S, bool logits_only>
void BM_weightedkv_block(benchmark::State& state) {
  const Threads th(static_cast<int>(state.range(0)));
  const Shape& sh = shape();
  const LayerShape s = layer_shape();
  const opt::LayerStorage& st = layer_storage(dtype_of<S>());
  const BlockKeys& bk = block_keys();
  constexpr std::int64_t kBlock = BlockKeys::kBlock;
  const std::int64_t B = bk.B, t0 = bk.t0, n_keys = bk.n_keys, d = sh.head_dim;
  const int G = s.group();
  const double t = timed_loop(state, [&] {
#pragma omp parallel
    {
      std::vector<float> logits(static_cast<std::size_t>(G * kBlock * n_keys)), probs(static_cast<std::size_t>(B));
#pragma omp for schedule(static)
      for (int g = 0; g < sh.kv_heads; ++g) {
        opt::cpu::group_block_logits(s, st.q.data<S>(), st.k.data<S>(), bk.keys[static_cast<std::size_t>(g)].data(),
                                     n_keys, g, t0, kBlock, logits.data());
        benchmark::DoNotOptimize(logits.data());
        if (logits_only) continue;
        for (std::int64_t u = 0; u < kBlock; ++u) {  // query t0 + u over the B slots it sees
          opt::cpu::group_prefix_softmax(logits.data() + u * n_keys, kBlock * n_keys, G, B, opt::cpu::Reduce::kSum,
                                         probs.data());
          benchmark::DoNotOptimize(probs.data());
        }
      }
    }
  });
  const double flops = 2.0 * s.q_heads * static_cast<double>(kBlock) * static_cast<double>(n_keys) * static_cast<double>(d);
  report(state, t, static_cast<double>((s.q_heads * kBlock + sh.kv_heads * n_keys) * d * sizeof(S)), flops,
         false);
  state.counters["queries"] = kBlock;
  state.counters["cache_slots"] = static_cast<double>(B);
}

/// EMS's centre assignment of one kv head at a budget of T/2: the T/2 odd
/// tokens are the rest, the even tokens but a 32-token window the centres
/// (every 16th full), similarity cos k * cos v: two GEMMs of rest x centres x d.
template <class S>
void BM_centre_assignment(benchmark::State& state) {
  const Threads th(static_cast<int>(state.range(0)));
  const Shape& sh = shape();
  const opt::LayerStorage& st = layer_storage(dtype_of<S>());
  const std::int64_t T = sh.tokens, window = 32;
  std::vector<std::int64_t> rest, centres;
  for (std::int64_t j = 0; j < T; ++j) (j % 2 ? rest : centres).push_back(j);
  centres.resize(centres.size() - static_cast<std::size_t>(window / 2));
  std::vector<char> can_take(centres.size());
  for (std::size_t c = 0; c < can_take.size(); ++c) can_take[c] = c % 16 != 15;
  const auto R = static_cast<std::int64_t>(rest.size()), C = static_cast<std::int64_t>(centres.size());
  std::vector<float> best(rest.size()), second(rest.size()), any(rest.size());
  std::vector<std::int64_t> centre(rest.size());
  const double t = timed_loop(state, [&] {
    opt::cpu::centre_assignment(st.k.data<S>(), st.v.data<S>(), sh.head_dim, rest.data(), R, centres.data(), C,
                                can_take.data(), false, 0.0f, best.data(), second.data(), centre.data(), any.data());
    benchmark::DoNotOptimize(centre.data());
  });
  const double rows = static_cast<double>((R + C) * 2 * sh.head_dim * sizeof(S));
  report(state, t, rows + static_cast<double>(R * (3 * 4 + 8)),
         2.0 * 2.0 * static_cast<double>(R) * static_cast<double>(C) * sh.head_dim, false);
  state.counters["rest"] = static_cast<double>(R);
  state.counters["centres"] = static_cast<double>(C);
}

}  // namespace

void register_merge_kernel_benchmarks() {
  const std::vector<int> threads = thread_counts(), all{threads.back()};
  benchmark::RegisterBenchmark("kernel/merge_runs/f32", BM_merge_runs)->UseRealTime()->Unit(benchmark::kMillisecond);
  register_threaded("kernel/gaussian_merge_weights/f16", BM_gaussian_merge_weights<f16>, threads);
  register_threaded("kernel/gaussian_merge_weights/bf16", BM_gaussian_merge_weights<bf16>, all);
  register_threaded("kernel/weightedkv_block_attention/f16", BM_weightedkv_block<f16, false>, all);
  register_threaded("kernel/group_block_logits/f16", BM_weightedkv_block<f16, true>, threads);
  register_threaded("kernel/centre_assignment_one_head/f16", BM_centre_assignment<f16>, all);
}

}  // namespace kvscope::bench
