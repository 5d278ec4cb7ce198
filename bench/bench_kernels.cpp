// The optimized/cpu kernels on one layer of the benchmark shape, plus the
// memory-bandwidth rows every bw_ratio divides by. bytes_processed counts the
// bytes that must move (inputs read once, outputs written once); memory-bound
// kernels read a rotating set of input copies (>= 4x the L3) so they run from DRAM.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "bench_kernel_util.hpp"
#include "bench_register.hpp"
#include "kvscope/opt/cpu/ragged.hpp"
#include "kvscope/opt/cpu/scores.hpp"
#include "kvscope/opt/cpu/select.hpp"

namespace kvscope::bench {
namespace {

// ---------------------------------------------------------------- bandwidth

void BM_memcpy(benchmark::State& state) {
  const std::size_t n = std::size_t{256} << 20;
  std::vector<unsigned char> a(n, 1), b(n, 2);
  const double t = timed_loop(state, [&] {
    std::memcpy(b.data(), a.data(), n);
    benchmark::ClobberMemory();
  });
  report(state, t, 2.0 * static_cast<double>(n), 0, true);
  state.counters["threads"] = 1;
}

void BM_omp_copy(benchmark::State& state) {
  const Threads th(static_cast<int>(state.range(0)));
  const std::size_t n = std::size_t{256} << 20;
  std::vector<unsigned char> a(n, 1), b(n, 2);
  const double t = timed_loop(state, [&] {
    omp_copy(b.data(), a.data(), n);
    benchmark::ClobberMemory();
  });
  report(state, t, 2.0 * static_cast<double>(n), 0, true);
}

void BM_omp_read(benchmark::State& state) {
  const Threads th(static_cast<int>(state.range(0)));
  const std::size_t n = std::size_t{256} << 20;
  std::vector<unsigned char> a(n, 3);
  const double t = timed_loop(state, [&] { benchmark::DoNotOptimize(omp_read(a.data(), n)); });
  report(state, t, static_cast<double>(n), 0, true);
}

// ---------------------------------------------------------------- scores

/// window_scores over the window `range(0)` (32: SnapKV/PyramidKV; 1: TOVA).
template <class S>
void BM_window_scores(benchmark::State& state) {
  const std::int64_t w = state.range(0);
  const Threads th(static_cast<int>(state.range(1)));
  const LayerShape s = layer_shape();
  const opt::LayerStorage& st = layer_storage(dtype_of<S>());
  const int copies = rotations(kv_elems() * sizeof(S));
  const std::vector<S> k = replicate(st.k.data<S>(), kv_elems(), copies);
  std::vector<float> out(static_cast<std::size_t>(s.q_heads * s.tokens));
  int c = 0;
  const auto call = [&] {
    opt::cpu::window_scores(s, st.q.data<S>(), k.data() + c * kv_elems(), w, opt::cpu::Reduce::kSum, out.data());
    benchmark::DoNotOptimize(out.data());
    c = (c + 1) % copies;
  };
  const double t = timed_loop(state, call);
  const double bytes = static_cast<double>(kv_elems() * sizeof(S)) +                   // K
                       static_cast<double>(s.q_heads * w * s.head_dim * sizeof(S)) +  // window queries
                       static_cast<double>(s.q_heads * s.tokens * 4);                 // scores
  report(state, t, bytes, 2.0 * s.q_heads * static_cast<double>(w) * static_cast<double>(s.tokens) * s.head_dim, w == 1,
         call);
}

template <class S>
void BM_key_norm_scores(benchmark::State& state) {
  const Threads th(static_cast<int>(state.range(0)));
  const LayerShape s = layer_shape();
  const opt::LayerStorage& st = layer_storage(dtype_of<S>());
  const int copies = rotations(kv_elems() * sizeof(S));
  const std::vector<S> k = replicate(st.k.data<S>(), kv_elems(), copies);
  std::vector<float> out(static_cast<std::size_t>(s.kv_heads * s.tokens));
  int c = 0;
  const auto call = [&] {
    opt::cpu::key_norm_scores(s, k.data() + c * kv_elems(), out.data());
    benchmark::DoNotOptimize(out.data());
    c = (c + 1) % copies;
  };
  const double t = timed_loop(state, call);
  report(state, t, static_cast<double>(kv_elems() * sizeof(S) + out.size() * 4), 2.0 * static_cast<double>(kv_elems()), true,
         call);
}

template <class S>
void BM_adjacent_key_cosine(benchmark::State& state) {
  const Threads th(static_cast<int>(state.range(0)));
  const LayerShape s = layer_shape();
  const opt::LayerStorage& st = layer_storage(dtype_of<S>());
  const int copies = rotations(kv_elems() * sizeof(S));
  const std::vector<S> k = replicate(st.k.data<S>(), kv_elems(), copies);
  std::vector<float> out(static_cast<std::size_t>(s.kv_heads * (s.tokens - 1)));
  int c = 0;
  const auto call = [&] {
    opt::cpu::adjacent_key_cosine(s, k.data() + c * kv_elems(), out.data());
    benchmark::DoNotOptimize(out.data());
    c = (c + 1) % copies;
  };
  const double t = timed_loop(state, call);
  report(state, t, static_cast<double>(kv_elems() * sizeof(S) + out.size() * 4), 6.0 * static_cast<double>(kv_elems()), true,
         call);
}

/// H2O's recompute without a recorded colsum: O(T^2 d) per q head. Run at
/// T/4 (1/16 of the work) to keep the suite short; cost scales with T^2.
template <class S>
void BM_accumulated_attention(benchmark::State& state) {
  const Threads th(static_cast<int>(state.range(0)));
  const LayerShape full = layer_shape();
  LayerShape s = full;
  s.tokens = full.tokens / 4;
  const opt::LayerStorage& st = layer_storage(dtype_of<S>());
  auto prefix = [&](const S* x, int heads) {  // the first s.tokens rows of every head
    std::vector<S> out;
    for (int h = 0; h < heads; ++h) {
      const S* src = x + static_cast<std::int64_t>(h) * full.tokens * full.head_dim;
      out.insert(out.end(), src, src + s.tokens * s.head_dim);
    }
    return out;
  };
  const std::vector<S> q = prefix(st.q.data<S>(), s.q_heads), k = prefix(st.k.data<S>(), s.kv_heads);
  std::vector<float> out(static_cast<std::size_t>(s.q_heads * s.tokens));
  const double t = timed_loop(state, [&] {
    opt::cpu::accumulated_attention(s, q.data(), k.data(), false, out.data());
    benchmark::DoNotOptimize(out.data());
  });
  const double T = static_cast<double>(s.tokens);
  report(state, t, static_cast<double>((q.size() + k.size()) * sizeof(S) + out.size() * 4),
         2.0 * s.q_heads * T * (T + 1) / 2 * s.head_dim, false);
  state.counters["tokens"] = T;
}

// ---------------------------------------------------------------- select / pool

/// top_k of T/2 per kv head over all T candidates (one thread: the kernel is serial).
void BM_top_k(benchmark::State& state) {
  const Shape& sh = shape();
  const std::vector<float> scores = random_scores(sh.kv_heads * sh.tokens, 7);
  std::vector<std::int64_t> candidates(static_cast<std::size_t>(sh.tokens));
  std::iota(candidates.begin(), candidates.end(), 0);
  std::vector<std::int64_t> kept;
  const double t = timed_loop(state, [&] {
    for (int h = 0; h < sh.kv_heads; ++h) {
      opt::cpu::top_k(scores.data() + static_cast<std::int64_t>(h) * sh.tokens, candidates, sh.tokens / 2, kept);
      benchmark::DoNotOptimize(kept.data());
    }
  });
  report(state, t, static_cast<double>(sh.kv_heads) * static_cast<double>(sh.tokens * (4 + 8) + sh.tokens / 2 * 8), 0, false);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * sh.kv_heads * sh.tokens);
  state.counters["threads"] = 1;
}

/// pool1d over every q head's past scores (SnapKV: kernel 5 avg; AdaKV preset: 7 max).
void BM_pool1d(benchmark::State& state) {
  const Shape& sh = shape();
  const auto kernel = state.range(0);
  const auto pool = state.range(1) == 0 ? opt::cpu::Pool::kAvg : opt::cpu::Pool::kMax;
  const std::int64_t n = sh.tokens - 32;
  const std::vector<float> x = random_scores(sh.q_heads * n, 3);
  std::vector<float> y(x.size());
  const double t = timed_loop(state, [&] {
    for (int h = 0; h < sh.q_heads; ++h) {
      opt::cpu::pool1d(x.data() + h * n, n, kernel, pool, y.data() + h * n);
      benchmark::DoNotOptimize(y.data());
    }
  });
  report(state, t, 2.0 * static_cast<double>(x.size() * 4), 0, false);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(x.size()));
  state.counters["threads"] = 1;
}

/// group_reduce of [q_heads, T] scores to [kv_heads, T] (mean).
void BM_group_reduce(benchmark::State& state) {
  const Shape& sh = shape();
  const std::vector<float> x = random_scores(sh.q_heads * sh.tokens, 5);
  std::vector<float> y(static_cast<std::size_t>(sh.kv_heads * sh.tokens));
  const double t = timed_loop(state, [&] {
    opt::cpu::group_reduce(x.data(), sh.q_heads, sh.kv_heads, sh.tokens, opt::cpu::Reduce::kMean, y.data());
    benchmark::DoNotOptimize(y.data());
  });
  report(state, t, static_cast<double>((x.size() + y.size()) * 4), 0, false);
  state.counters["threads"] = 1;
}

// ---------------------------------------------------------------- ragged cache

/// A compression plan of every kv head in CSR form (no re-rotation).
struct CsrPlan {
  std::vector<std::int64_t> offsets{0}, row_ptr{0}, token;
  std::vector<float> coef_k, coef_v;
  opt::cpu::RaggedPlan view() const {
    return {static_cast<int>(offsets.size()) - 1, offsets.data(), row_ptr.data(), token.data(), coef_k.data(),
            coef_v.data(), nullptr, 10000.0};
  }
  std::int64_t slots() const { return offsets.back(); }
  void add_entry(std::int64_t token_index, float ck, float cv) {
    token.push_back(token_index);
    coef_k.push_back(ck);
    coef_v.push_back(cv);
  }
  void end_row() { row_ptr.push_back(static_cast<std::int64_t>(token.size())); }
  void end_head() { offsets.push_back(static_cast<std::int64_t>(row_ptr.size()) - 1); }
};

/// 50% eviction: a seeded random half of each head's tokens (sorted), one-hot rows.
CsrPlan half_plan() {
  const Shape& sh = shape();
  CsrPlan p;
  std::mt19937_64 rng(11);
  std::vector<std::int64_t> all(static_cast<std::size_t>(sh.tokens));
  for (int h = 0; h < sh.kv_heads; ++h) {
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    std::vector<std::int64_t> kept(all.begin(), all.begin() + sh.tokens / 2);
    std::sort(kept.begin(), kept.end());
    for (std::int64_t j : kept) {
      p.add_entry(j, 1.0f, 1.0f);
      p.end_row();
    }
    p.end_head();
  }
  return p;
}

/// Neighbour merges to half the tokens: slot j = (token 2j, token 2j + 1) with
/// seeded convex weights (the value merges of WeightedKV and KVMerger are such
/// rows; the keys keep the first token, as WeightedKV does).
CsrPlan pair_merge_plan() {
  const Shape& sh = shape();
  CsrPlan p;
  std::mt19937_64 rng(13);
  std::uniform_real_distribution<float> u(0.1f, 0.9f);
  for (int h = 0; h < sh.kv_heads; ++h) {
    for (std::int64_t j = 0; j + 1 < sh.tokens; j += 2) {
      const float a = u(rng);
      p.add_entry(j, 1.0f, a);
      p.add_entry(j + 1, 0.0f, 1.0f - a);
      p.end_row();
    }
    p.end_head();
  }
  return p;
}

/// apply_ragged_plan of `make_plan()`: every plan entry's K and V rows read
/// once, K' and V' written once.
template <class S, CsrPlan (*make_plan)()>
void BM_apply_ragged_plan(benchmark::State& state) {
  const Threads th(static_cast<int>(state.range(0)));
  const Shape& sh = shape();
  const opt::LayerStorage& st = layer_storage(dtype_of<S>());
  const CsrPlan plan = make_plan();
  const opt::cpu::RaggedPlan rp = plan.view();
  const std::int64_t in_n = kv_elems(), out_n = plan.slots() * sh.head_dim;
  const int copies = rotations(2 * (in_n + out_n) * sizeof(S));
  const std::vector<S> k = replicate(st.k.data<S>(), in_n, copies), v = replicate(st.v.data<S>(), in_n, copies);
  std::vector<S> ko(static_cast<std::size_t>(out_n * copies)), vo(ko.size());
  int c = 0;
  const auto call = [&] {
    opt::cpu::apply_ragged_plan(rp, k.data() + c * in_n, v.data() + c * in_n, sh.tokens, sh.head_dim,
                                ko.data() + c * out_n, vo.data() + c * out_n);
    benchmark::DoNotOptimize(ko.data());
    c = (c + 1) % copies;
  };
  const double t = timed_loop(state, call);
  const double row = static_cast<double>(sh.head_dim * sizeof(S));
  const double read = 2.0 * row * static_cast<double>(plan.token.size());  // K and V rows of every entry
  const double written = 2.0 * row * static_cast<double>(plan.slots());
  const double meta = static_cast<double>((plan.offsets.size() + plan.row_ptr.size() + plan.token.size()) * 8 +
                                          (plan.coef_k.size() + plan.coef_v.size()) * 4);
  report(state, t, read + written + meta, 0, true, call);
  state.counters["slots"] = static_cast<double>(plan.slots());
}

/// One decode query per q head over a ragged cache of T/2 slots per kv head;
/// with LogBias, each logit gets the slot's log merge count (1 to 4 tokens).
template <class S, bool LogBias>
void BM_decode_attention(benchmark::State& state) {
  const Threads th(static_cast<int>(state.range(0)));
  const Shape& sh = shape();
  const opt::LayerStorage& st = layer_storage(dtype_of<S>());
  const CsrPlan plan = half_plan();
  const std::int64_t n = plan.slots() * sh.head_dim;
  std::vector<float> bias(LogBias ? static_cast<std::size_t>(plan.slots()) : 0);
  for (std::size_t j = 0; j < bias.size(); ++j) bias[j] = std::log(static_cast<float>(1 + j % 4));
  std::vector<S> k1(static_cast<std::size_t>(n)), v1(k1.size());
  opt::cpu::apply_ragged_plan(plan.view(), st.k.data<S>(), st.v.data<S>(), sh.tokens, sh.head_dim, k1.data(), v1.data());
  const int copies = rotations(2 * n * sizeof(S));
  const std::vector<S> k = replicate(k1.data(), n, copies), v = replicate(v1.data(), n, copies);
  std::vector<float> q(static_cast<std::size_t>(sh.q_heads * sh.head_dim)), out(q.size());
  for (int h = 0; h < sh.q_heads; ++h)  // the layer's last prompt queries stand in for a decode query
    for (int i = 0; i < sh.head_dim; ++i)
      q[static_cast<std::size_t>(h * sh.head_dim + i)] = st.q.get((static_cast<std::int64_t>(h) * sh.tokens + sh.tokens - 1) * sh.head_dim + i);
  int c = 0;
  const auto call = [&] {
    opt::cpu::decode_attention(q.data(), sh.q_heads, sh.kv_heads, sh.head_dim, plan.offsets.data(), k.data() + c * n,
                               v.data() + c * n, LogBias ? bias.data() : nullptr, out.data());
    benchmark::DoNotOptimize(out.data());
    c = (c + 1) % copies;
  };
  const double t = timed_loop(state, call);
  report(state, t,
         static_cast<double>(2 * n * sizeof(S) + (q.size() + out.size() + bias.size()) * 4 + plan.offsets.size() * 8),
         4.0 * sh.q_heads * static_cast<double>(plan.slots() / sh.kv_heads) * sh.head_dim, true, call);
  state.counters["slots_per_head"] = static_cast<double>(plan.slots() / sh.kv_heads);
}

template <class S>
void register_typed(const std::vector<int>& threads, bool sweep_threads) {
  const std::string d = dtype_name<S>();
  const std::vector<int> ts = sweep_threads ? threads : std::vector<int>{threads.back()};
  const auto add = [&](const std::string& name, void (*fn)(benchmark::State&)) {
    return register_threaded("kernel/" + name + "/" + d, fn, ts);
  };
  add("key_norm_scores", BM_key_norm_scores<S>);
  add("adjacent_key_cosine", BM_adjacent_key_cosine<S>);
  add("apply_ragged_plan_50pct", BM_apply_ragged_plan<S, half_plan>);
  add("apply_ragged_plan_merge_pairs", BM_apply_ragged_plan<S, pair_merge_plan>);
  add("decode_attention_ragged", BM_decode_attention<S, false>);
  if (sweep_threads)  // the merging families' decode: one row, the log-count bias on
    register_threaded("kernel/decode_attention_ragged_logbias/" + d, BM_decode_attention<S, true>, {threads.back()});
  {
    auto* b = benchmark::RegisterBenchmark(("kernel/window_scores/" + d).c_str(), BM_window_scores<S>);
    b->ArgNames({"window", "threads"})->UseRealTime()->Unit(benchmark::kMillisecond);
    for (int t : ts) b->Args({1, t});
    if (sweep_threads) {
      b->Args({8, threads.back()});  // DynamicKV's observation window (its first pass runs this per layer)
      for (int t : ts) b->Args({32, t});
    }
  }
  if (sweep_threads)
    register_threaded("kernel/accumulated_attention_quarterT/" + d, BM_accumulated_attention<S>, {threads.back()})
        ->Iterations(2);
}

}  // namespace

void register_kernel_benchmarks() {
  const std::vector<int> threads = thread_counts();
  benchmark::RegisterBenchmark("bandwidth/memcpy_256MiB", BM_memcpy)->UseRealTime()->Unit(benchmark::kMillisecond);
  auto* copy = benchmark::RegisterBenchmark("bandwidth/omp_copy_256MiB", BM_omp_copy)->ArgName("threads");
  auto* read = benchmark::RegisterBenchmark("bandwidth/omp_read_256MiB", BM_omp_read)->ArgName("threads");
  for (int t : threads) {
    copy->Arg(t);
    read->Arg(t);
  }
  copy->UseRealTime()->Unit(benchmark::kMillisecond);
  read->UseRealTime()->Unit(benchmark::kMillisecond);

  register_typed<f16>(threads, true);
  register_typed<float>(threads, false);
  register_typed<bf16>(threads, false);

  benchmark::RegisterBenchmark("kernel/top_k_half/f32", BM_top_k)->UseRealTime()->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("kernel/pool1d/f32", BM_pool1d)
      ->ArgNames({"kernel", "max"})
      ->Args({5, 0})
      ->Args({7, 1})
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("kernel/group_reduce_mean/f32", BM_group_reduce)->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace kvscope::bench
