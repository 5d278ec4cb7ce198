// Prefill compression of one layer by every method the CPU backend has, on the
// backend (fp16 storage, fp32 kernels, OpenMP) and on the double-precision
// reference, at a budget of T/2 per kv head. Layers are independent, so a
// whole 32-layer trace costs 32x the per-layer time (counter x32_ms).
#include <omp.h>

#include <algorithm>
#include <map>
#include <memory>
#include <string>

#include "bench_common.hpp"
#include "bench_register.hpp"
#include "kvscope/core/method_spec.hpp"
#include "kvscope/opt/backend.hpp"
#include "kvscope/reference/methods/adakv.hpp"
#include "kvscope/reference/methods/cam.hpp"
#include "kvscope/reference/methods/dynamickv.hpp"
#include "kvscope/reference/methods/ems.hpp"
#include "kvscope/reference/methods/snapkv.hpp"
#include "kvscope/reference/methods/weightedkv.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/replay/layer_input.hpp"

namespace kvscope::bench {
namespace {

std::int64_t budget() { return shape().tokens / 2; }

/// The reference's double view of the benchmark layer (with attn_colsum), built
/// once; mutable only for the layer index and coupling of a first pass.
ref::LayerInput& reference_input() {
  static ref::LayerInput in = [] {
    const BenchLayer& b = method_layer();
    return replay::make_layer_input(b.meta, shape().layer, b.data);
  }();
  return in;
}

/// The backend's view: fp16 storage (with attn_colsum), built once (mutable as above).
opt::LayerStorage& backend_input() {
  static opt::LayerStorage in = [] {
    const BenchLayer& b = method_layer();
    return opt::pack_layer(b.meta, shape().layer, b.data);
  }();
  return in;
}

/// Mean seconds per call measured in this process (by the benchmark that ran
/// it, or once on demand when that benchmark was filtered out).
std::map<std::string, double>& measured() {
  static std::map<std::string, double> m;
  return m;
}

template <class F>
double measured_or_once(const std::string& key, F&& f) {
  auto it = measured().find(key);
  if (it != measured().end()) return it->second;
  return measured()[key] = seconds(f);
}

double conversion_seconds() {
  return measured_or_once("conversion", [] {
    const BenchLayer& b = method_layer();
    benchmark::DoNotOptimize(replay::make_layer_input(b.meta, shape().layer, b.data));
  });
}

void BM_make_layer_input(benchmark::State& state) {
  const BenchLayer& b = method_layer();
  measured()["conversion"] =
      timed_loop(state, [&] { benchmark::DoNotOptimize(replay::make_layer_input(b.meta, shape().layer, b.data)); });
  const Shape& s = shape();
  state.SetBytesProcessed(state.iterations() * (s.q_heads + 2 * s.kv_heads) * s.tokens * s.head_dim * 12);
  state.counters["threads"] = 1;
}

void BM_pack_layer(benchmark::State& state) {
  const BenchLayer& b = method_layer();
  timed_loop(state, [&] { benchmark::DoNotOptimize(opt::pack_layer(b.meta, shape().layer, b.data)); });
  const Shape& s = shape();
  state.SetBytesProcessed(state.iterations() * (s.q_heads + 2 * s.kv_heads) * s.tokens * s.head_dim * 6);
  state.counters["threads"] = 1;
}

/// Prefill of the bench layer. A layer-coupled method (DynamicKV) first sees
/// every layer of the model (Method::coupling): the bench layer stands in for
/// each of them, so the row is one first pass over all layers plus one prefill.
template <class M, class In>
ref::LayerPlans prefill_with_first_pass(const M& m, In& in) {
  auto coupling = m.coupling(method_layer().meta, budget());
  if (!coupling) return m.prefill(in, budget());
  const int layer = in.layer;
  for (int l = 0; l < method_layer().meta.layers; ++l) {
    in.layer = l;
    coupling->observe(in);
  }
  in.layer = layer;
  in.coupling = coupling.get();
  ref::LayerPlans plans = m.prefill(in, budget());
  in.coupling = nullptr;
  return plans;
}

double kept_fraction(const ref::LayerPlans& p) {
  double slots = 0;
  for (const Plan& plan : p.plans) slots += static_cast<double>(plan.slots());
  return slots / (static_cast<double>(p.plans.size()) * static_cast<double>(shape().tokens));
}

/// The least work of a family's prefill of the bench layer on the backend
/// (fp16 storage, recorded attn_colsum): the bytes its kernels must move and
/// the flops they must do, from the family's resolved parameters (the bytes
/// of the returned plans are added by the caller, from the reference's). exps,
/// selection and decision code are not counted, so the floor below is
/// optimistic. A model of the algorithm, not of our code: it stays put when
/// a kernel changes (docs/performance.md, "Floor").
struct Work {
  double bytes = 0, flops = 0;
};

Work least_work(const MethodSpec& spec) {
  const Shape& s = shape();
  const ref::ResolvedSpec r = ref::resolve_spec(spec);
  const double T = static_cast<double>(s.tokens), B = static_cast<double>(budget()), d = s.head_dim;
  const double hq = s.q_heads, hkv = s.kv_heads, h16 = 2.0;  // bytes per fp16 element
  const double K = hkv * T * d * h16, scores = hkv * T * 4;
  // Window scores: w queries per q head against every key (q.k once per pair).
  const auto window = [&](double w) { return Work{K + hq * w * d * h16 + hq * T * 4, 2.0 * hq * w * T * d}; };
  // Streaming attention: prompt query t over the min(t + 1, B) slots it sees.
  const Work streamed{K + hq * T * d * h16, 2.0 * hq * d * (B * (B + 1) / 2 + (T - B) * B)};
  const std::string& f = spec.family;
  if (f == "knorm") return {K + scores, 2.0 * hkv * T * d};
  if (f == "h2o") return {hq * T * 4, 0};  // the recorded column sums
  if (f == "tova") return window(1);
  if (f == "snapkv" || f == "pyramidkv")
    return window(static_cast<double>(ref::snapkv_config(r.params, f).window));
  if (f == "adakv") {
    const MethodSpec base = ref::adakv_base(r.params);
    return window(static_cast<double>(ref::snapkv_config(ref::resolve_spec(base).params, base.family).window));
  }
  if (f == "kvmerger") return {K + scores, 9.0 * hkv * T * d};  // adjacent cosines and Gaussian distances, K read once
  if (f == "weightedkv" && ref::weightedkv_config(r.params).streaming_prefill) return streamed;
  if (f == "cam" && ref::cam_config(r.params).prefill == ref::CamPrefill::kSimulate) return streamed;
  if (f == "ems") {  // s_Loc over the observation window, then rest x centres similarities of keys and values
    const ref::EmsConfig c = ref::ems_config(r.params);
    const double rest = T - B, centres = B - static_cast<double>(std::min<std::int64_t>(c.window, budget()));
    Work w = window(static_cast<double>(c.obs_window));
    w.bytes += K + hq * T * 4;  // V (K is counted once, above) and the recorded column sums
    w.flops += hkv * 2.0 * 2.0 * rest * centres * d;
    return w;
  }
  if (f == "dynamickv") {  // the first pass scores every layer's window
    const double w = static_cast<double>(ref::dynamickv_config(r.params).effective_window(s.tokens));
    const Work one = window(w);
    return {one.bytes * s.layers, one.flops * s.layers};
  }
  return {};  // position arithmetic only (full, streaming_llm): no kernel
}

/// Bytes of the plans a prefill must return (the reference's, which every
/// backend must equal): CSR row pointers, entries (token, coef_k, coef_v) and
/// each slot's position and count, 8 bytes each. A method with no kernel
/// still writes them, but its floor stays 0 (nothing to compare).
double plan_bytes(const ref::LayerPlans& p) {
  double b = 0;
  for (const Plan& plan : p.plans)
    b += 8.0 * static_cast<double>((plan.slots() + 1) + 3 * plan.nnz() + 2 * plan.slots());
  return b;
}

/// Seconds the least work takes at the limits measured in this process (0: no kernel).
double floor_seconds(const Work& w) {
  const Limits& l = limits();
  return std::max(w.bytes / l.copy_Bps, w.flops / l.peak_flops);
}

void BM_reference_prefill(benchmark::State& state, const std::string& family) {
  const std::unique_ptr<ref::Method> m = ref::make_method(MethodSpec::parse(family));
  ref::LayerInput& in = reference_input();
  ref::LayerPlans plans;
  const double s = timed_loop(state, [&] { plans = prefill_with_first_pass(*m, in); });
  measured()["ref:" + family] = s;
  const double conv = conversion_seconds();
  state.counters["threads"] = 1;
  state.counters["kept"] = kept_fraction(plans);
  state.counters["incl_conv_ms"] = (s + conv) * 1e3;
  state.counters["x32_ms"] = 32 * s * 1e3;
}

/// The paired speed-up's budget of rounds, and the longest reference call it pairs.
constexpr double kPairedSeconds = 4.0;
constexpr double kMaxPairedRefSeconds = 10.0;

void BM_cpu_prefill(benchmark::State& state, const std::string& family) {
  const MethodSpec spec = MethodSpec::parse(family);
  const std::unique_ptr<opt::BackendMethod> m = opt::make_cpu_method(spec);
  opt::LayerStorage& in = backend_input();
  ref::LayerPlans plans;
  const double s = timed_loop(state, [&] { plans = prefill_with_first_pass(*m, in); });
  ref::LayerInput& ref_in = reference_input();  // built before timing, when the reference row was filtered out
  const double ref_s = measured_or_once("ref:" + family, [&] {
    benchmark::DoNotOptimize(prefill_with_first_pass(*ref::make_method(spec), ref_in));
  });
  const double conv = conversion_seconds();
  // Agreement with the reference (informative; the differential tests are the check).
  static std::map<std::string, ref::LayerPlans> reference_plans;
  if (!reference_plans.count(family))
    reference_plans[family] = prefill_with_first_pass(*ref::make_method(spec), ref_in);
  const ref::LayerPlans& want = reference_plans[family];
  double same = 0;
  for (std::size_t h = 0; h < plans.plans.size() && h < want.plans.size(); ++h)
    same += plans.plans[h].token == want.plans[h].token ? 1 : 0;
  state.counters["threads"] = omp_get_max_threads();
  state.counters["kept"] = kept_fraction(plans);
  state.counters["same_plans"] = same / static_cast<double>(want.plans.size());
  state.counters["ref_ms"] = ref_s * 1e3;
  state.counters["speedup"] = ref_s / s;
  // The same ratio in pairs of calls (the target's figure): up to ~4 s of
  // rounds, at least one; none where one reference call takes longer than
  // kMaxPairedRefSeconds (cam, weightedkv, ems: their rows are minutes long
  // already, and far from the target or timed by single calls either way).
  if (ref_s <= kMaxPairedRefSeconds) {
    const std::unique_ptr<ref::Method> rm = ref::make_method(spec);
    const int rounds = std::clamp(static_cast<int>(kPairedSeconds / (2 * ref_s)), 1, 21);
    const int calls = std::clamp(static_cast<int>(0.5 * ref_s / s), 1, 64);  // each side ~ half a reference call
    const PairedRatio p = paired_ratio([&] { benchmark::DoNotOptimize(prefill_with_first_pass(*rm, ref_in)); },
                                       [&] { benchmark::DoNotOptimize(prefill_with_first_pass(*m, in)); }, rounds, calls);
    state.counters["speedup_paired"] = p.median;
    state.counters["paired_lo"] = p.lo;
    state.counters["paired_hi"] = p.hi;
    state.counters["paired_rounds"] = p.rounds;
  }
  state.counters["speedup_incl_conv"] = (ref_s + conv) / s;
  state.counters["x32_ms"] = 32 * s * 1e3;
  // How far the target is from the machine: the floor of the least work, the
  // speed-up a backend at that floor would reach, and the share of the floor
  // this backend reaches.
  Work work = least_work(spec);
  if (work.bytes > 0 || work.flops > 0) {  // the plans returned are part of the work
    const double plans_b = plan_bytes(want);
    work.bytes += plans_b;
    state.counters["plan_MB"] = plans_b / 1e6;
  }
  const double floor_s = floor_seconds(work);
  if (floor_s > 0) {
    state.counters["floor_ms"] = floor_s * 1e3;
    state.counters["max_speedup"] = ref_s / floor_s;
    state.counters["floor_frac"] = floor_s / s;
  }
  if (family == "h2o")  // what the prefill would cost on a trace without attn_colsum
    state.counters["colsum_recompute_ms"] = method_layer().colsum_seconds * 1e3;
}

}  // namespace

void register_method_benchmarks() {
  benchmark::RegisterBenchmark("convert/make_layer_input_double", BM_make_layer_input)
      ->MinTime(1.0)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("convert/pack_layer_f16", BM_pack_layer)->UseRealTime()->Unit(benchmark::kMillisecond);
  for (const std::string& f : opt::cpu_families()) {
    // The reference's time is the speed-up's numerator: 2 s of iterations
    // (one when a call takes longer), as one call of it varied ~3x (run 4).
    benchmark::RegisterBenchmark(("prefill/reference/" + f).c_str(), BM_reference_prefill, f)
        ->MinTime(2.0)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("prefill/cpu/" + f).c_str(), BM_cpu_prefill, f)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace kvscope::bench
