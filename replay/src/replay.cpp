#include "kvscope/replay/replay.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <optional>

#include "kvscope/core/error.hpp"
#include "kvscope/core/tolerance.hpp"
#include "kvscope/opt/ragged_cache.hpp"
#include "kvscope/reference/perturbation_bound.hpp"
#include "kvscope/reference/plan_apply.hpp"
#include "kvscope/reference/plan_checker.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/traces/plan_dump.hpp"
#include "kvscope/traces/trace_io.hpp"
#include "kvscope/replay/layer_input.hpp"

namespace kvscope::replay {
namespace {

using ref::HeadCache;
using ref::MatX;
using ref::VecX;

/// The full cache of one layer: all keys/values and the reference outputs of
/// every decode query, computed once and shared by every run.
struct FullLayer {
  std::vector<MatX> K, V;                     // per kv head, [T + S, d]
  std::vector<std::vector<VecX>> q;           // [q head][step]
  std::vector<std::vector<VecX>> out, probs;  // [q head][step]
};

FullLayer full_layer(const TraceMeta& meta, const LayerData& data, TraceSelfCheck& self_check) {
  FullLayer f;
  const std::int64_t T = meta.prompt_len, S = meta.decode_steps;
  for (int h = 0; h < meta.kv_heads; ++h) {
    f.K.push_back(full_rows(data.prefill_k, data.decode_k, h));
    f.V.push_back(full_rows(data.prefill_v, data.decode_v, h));
  }
  f.q.resize(static_cast<std::size_t>(meta.q_heads));
  f.out = f.probs = f.q;
  for (int h = 0; h < meta.q_heads; ++h) {
    const int kv = ref::kv_head_of(h, meta.q_heads, meta.kv_heads);
    const MatX Q = head_matrix(data.decode_q, h);
    for (std::int64_t s = 0; s < S; ++s) {
      const std::int64_t n = T + s + 1;
      VecX q = Q.row(s).transpose();
      ref::AttentionResult r = ref::attend(q, f.K[static_cast<std::size_t>(kv)].topRows(n),
                                           f.V[static_cast<std::size_t>(kv)].topRows(n));
      if (data.decode_o) {
        VecX rec(meta.head_dim);
        const auto row = data.decode_o->row(h, s);
        for (int i = 0; i < meta.head_dim; ++i) rec[i] = row[static_cast<std::size_t>(i)];
        const double norm = r.output.norm();
        const double err = (rec - r.output).norm() / (norm > 0 ? norm : 1.0);
        self_check.recorded = true;
        self_check.max_rel_l2 = std::max(self_check.max_rel_l2, err);
      }
      f.q[static_cast<std::size_t>(h)].push_back(std::move(q));
      f.out[static_cast<std::size_t>(h)].push_back(std::move(r.output));
      f.probs[static_cast<std::size_t>(h)].push_back(std::move(r.probs));
    }
  }
  return f;
}

/// Appends token `j` (the decode step's own key and value) as a new one-hot slot.
void append_to_cache(HeadCache& c, const MatX& K, const MatX& V, double theta) {
  append_token(c.plan);
  const std::int64_t j = c.plan.n - 1, pos = c.plan.position.back();
  c.K.conservativeResize(c.K.rows() + 1, Eigen::NoChange);
  c.V.conservativeResize(c.V.rows() + 1, Eigen::NoChange);
  if (pos == j)
    c.K.row(c.K.rows() - 1) = K.row(j);
  else
    c.K.row(c.K.rows() - 1) = ref::rope_rotate(K.row(j).transpose(), static_cast<double>(pos - j), theta).transpose();
  c.V.row(c.V.rows() - 1) = V.row(j);
}

void apply_step(std::vector<HeadCache>& caches, const ref::StepPlans& plans, const FullLayer& f, double theta) {
  for (std::size_t h = 0; h < plans.size() && h < caches.size(); ++h)
    if (plans[h]) caches[h] = ref::apply_plan(compose(*plans[h], caches[h].plan), f.K[h], f.V[h], theta);
}

/// One (method, budget) run over one layer.
class LayerRun {
 public:
  LayerRun(const TraceMeta& meta, int layer, const ref::Method& method, const opt::BackendMethod* backend,
           std::int64_t budget, int run_index, RunSummary& summary, RecordSink* sink)
      : meta_(meta), layer_(layer), method_(method), backend_(backend), budget_(budget), run_(run_index),
        summary_(summary), sink_(sink) {}

  std::vector<HeadCache> prefill(const ref::LayerInput& in, const opt::LayerStorage* storage, const FullLayer& f,
                                 traces::PlanDumpWriter* dump) {
    const ref::LayerPlans out = backend_ ? backend_->prefill(*storage, budget_) : method_.prefill(in, budget_);
    const std::vector<Plan>& plans = out.plans;
    if (static_cast<int>(plans.size()) != meta_.kv_heads || out.head_budgets.size() != plans.size())
      throw Error(ErrorKind::kInvariant, method_.name() + ": prefill returned " + std::to_string(plans.size()) +
                                             " plans and " + std::to_string(out.head_budgets.size()) +
                                             " budgets for " + std::to_string(meta_.kv_heads) + " kv heads");
    ref::require_valid_allocation(out.head_budgets, budget_, method_.laws().allocation, context("prefill"));
    head_budgets_ = out.head_budgets;
    std::vector<HeadCache> caches;
    for (int h = 0; h < meta_.kv_heads; ++h) {
      check(plans[static_cast<std::size_t>(h)], method_.laws().prefill_budget, h, "prefill");
      if (dump) dump->add(method_.name(), summary_.budget, layer_, h, "prefill", plans[static_cast<std::size_t>(h)]);
      if (!backend_)
        caches.push_back(ref::apply_plan(plans[static_cast<std::size_t>(h)], f.K[static_cast<std::size_t>(h)],
                                         f.V[static_cast<std::size_t>(h)], meta_.rope_theta));
    }
    if (backend_) caches = backend_caches(*storage, plans);
    return caches;
  }

  void decode(const ref::LayerInput& in, const FullLayer& f, std::vector<HeadCache>& caches) {
    std::unique_ptr<ref::DecodePolicy> policy = method_.decoder(in, head_budgets_);
    const double theta = meta_.rope_theta;
    std::vector<VecX> queries(static_cast<std::size_t>(meta_.q_heads));
    std::vector<VecX> probs(static_cast<std::size_t>(meta_.q_heads));
    for (std::int64_t s = 0; s < meta_.decode_steps; ++s) {
      for (int h = 0; h < meta_.kv_heads; ++h)
        append_to_cache(caches[static_cast<std::size_t>(h)], f.K[static_cast<std::size_t>(h)],
                        f.V[static_cast<std::size_t>(h)], theta);
      for (int h = 0; h < meta_.q_heads; ++h) queries[static_cast<std::size_t>(h)] = f.q[static_cast<std::size_t>(h)][static_cast<std::size_t>(s)];
      const ref::DecodeStep step{s, meta_.prompt_len + s, &caches, &queries};
      if (policy) apply_step(caches, policy->before_attend(step), f, theta);

      for (int h = 0; h < meta_.q_heads; ++h) {
        const auto hu = static_cast<std::size_t>(h);
        const HeadCache& c = caches[static_cast<std::size_t>(ref::kv_head_of(h, meta_.q_heads, meta_.kv_heads))];
        VecX q = queries[hu];
        // A re-rotated cache holds the current token at its slot index: the query moves with it.
        if (c.plan.positions == PositionMode::kRerotated)
          q = ref::rope_rotate(q, static_cast<double>(c.plan.position.back() - step.token), theta);
        ref::AttentionResult r = ref::attend(q, c.K, c.V);
        const VecX& p_full = f.probs[hu][static_cast<std::size_t>(s)];
        StepRecord rec{run_, layer_, h, s, c.plan.slots(),
                       step_metrics(f.out[hu][static_cast<std::size_t>(s)], p_full, r.output, r.probs, c.plan)};
        const int kv = ref::kv_head_of(h, meta_.q_heads, meta_.kv_heads);
        rec.metrics.bound = ref::perturbation_bound(c.plan, p_full, f.V[static_cast<std::size_t>(kv)], c.V, r.probs).value;
        require_finite(rec);
        require_within_bound(rec, f.out[hu][static_cast<std::size_t>(s)].norm());
        record(rec, c.plan);
        probs[hu] = std::move(r.probs);
      }
      if (policy) apply_step(caches, policy->after_attend(step, probs), f, theta);
      for (int h = 0; h < meta_.kv_heads; ++h)
        check(caches[static_cast<std::size_t>(h)].plan, method_.laws().decode_budget, h, "decode step " + std::to_string(s));
    }
  }

 private:
  std::string context(const std::string& stage) const {
    return method_.name() + " budget " + summary_.budget + " layer " + std::to_string(layer_) + " " + stage;
  }

  void check(const Plan& plan, ref::BudgetLaw law, int kv_head, const std::string& stage) {
    const std::int64_t b = head_budgets_[static_cast<std::size_t>(kv_head)];
    ref::CheckRequest req{law, b, method_.laws().conservation, method_.protected_tokens(plan.n, b)};
    ref::require_valid_plan(plan, req, context("kv head " + std::to_string(kv_head) + " " + stage));
    ++summary_.plans_checked;
  }

  // Numbers policy (docs/robustness.md): inputs are finite (checked on read), so
  // a non-finite metric is an overflow the reference did not survive. It is an
  // error naming where, never a NaN in a table. TV is NaN by design ("n/a")
  // for non-eviction plans, so only an infinite TV counts.
  void require_finite(const StepRecord& rec) const {
    const StepMetrics& m = rec.metrics;
    const char* bad = !std::isfinite(m.rel_l2) ? "rel-L2" : !std::isfinite(m.cosine) ? "cosine"
                    : !std::isfinite(m.mass_lost) ? "mass lost" : std::isinf(m.tv) ? "TV"
                    : !std::isfinite(m.bound) ? "perturbation bound" : !std::isfinite(m.err) ? "error" : nullptr;
    if (bad != nullptr)
      throw Error(ErrorKind::kBadNumber, context("q head " + std::to_string(rec.q_head) + " decode step " +
                                                 std::to_string(rec.step)) +
                                             ": " + bad + " is not finite (the values overflowed double precision)");
  }

  // The bound is an inequality: a measured error above it means the plan, the
  // cache or the attention is wrong. Slack covers rounding in both sides, and
  // for a backend's storage-precision cache its tolerance (core/tolerance.hpp).
  void require_within_bound(const StepRecord& rec, double out_norm) const {
    const double storage = backend_ ? tolerance(meta_.dtype).rel_l2 * out_norm : 0.0;
    const double slack = 1e-9 * (1.0 + rec.metrics.bound) + 1e-12 + storage;
    if (rec.metrics.err > rec.metrics.bound + slack)
      throw Error(ErrorKind::kInvariant, context("q head " + std::to_string(rec.q_head) + " decode step " +
                                                 std::to_string(rec.step)) +
                                             ": attention-output error " + std::to_string(rec.metrics.err) +
                                             " exceeds the perturbation bound " + std::to_string(rec.metrics.bound));
  }

  void record(const StepRecord& rec, const Plan& plan) {
    const double kept = static_cast<double>(plan.slots()) / static_cast<double>(plan.n);
    summary_.all.add(rec.metrics, kept);
    summary_.per_layer_head[static_cast<std::size_t>(layer_ * meta_.q_heads + rec.q_head)].add(rec.metrics, kept);
    summary_.per_step[static_cast<std::size_t>(rec.step)].add(rec.metrics, kept);
    if (sink_) sink_->on_record(rec);
  }

  // The backend's compressed cache (storage dtype) as the reference's HeadCache.
  std::vector<HeadCache> backend_caches(const opt::LayerStorage& storage, const std::vector<Plan>& plans) const {
    const opt::RaggedCache rc = opt::compact(storage, plans, meta_.rope_theta);
    std::vector<HeadCache> caches;
    const int d = meta_.head_dim;
    for (int h = 0; h < meta_.kv_heads; ++h) {
      HeadCache c;
      c.plan = plans[static_cast<std::size_t>(h)];
      const std::int64_t first = rc.offsets[static_cast<std::size_t>(h)], rows = rc.offsets[static_cast<std::size_t>(h) + 1] - first;
      c.K.resize(rows, d);
      c.V.resize(rows, d);
      for (std::int64_t r = 0; r < rows; ++r)
        for (int i = 0; i < d; ++i) {
          c.K(r, i) = static_cast<double>(rc.k.get((first + r) * d + i));
          c.V(r, i) = static_cast<double>(rc.v.get((first + r) * d + i));
        }
      caches.push_back(std::move(c));
    }
    return caches;
  }

  const TraceMeta& meta_;
  int layer_;
  const ref::Method& method_;
  const opt::BackendMethod* backend_;  // nullptr: the reference computes prefill
  std::int64_t budget_;
  int run_;
  RunSummary& summary_;
  RecordSink* sink_;
  std::vector<std::int64_t> head_budgets_;  // from prefill; the budget law holds each head to its own
};

/// The runs of a replay, configured before any data is read: unknown methods,
/// bad parameters and impossible budgets fail here (protected_tokens resolves
/// the budget), so check_replay_options and run_replay share one validation.
struct ConfiguredRuns {
  struct Run {
    const ref::Method* method;
    const opt::BackendMethod* backend;
    std::int64_t budget;
  };
  std::vector<std::unique_ptr<ref::Method>> methods;
  std::vector<std::unique_ptr<opt::BackendMethod>> backends;
  std::vector<Run> runs;
  std::vector<RunSummary> summaries;  // one per run, labels filled in
};

ConfiguredRuns configure_runs(const TraceMeta& meta, const ReplayOptions& options) {
  if (meta.decode_steps == 0)
    throw Error(ErrorKind::kUsage, "the trace has no decode steps: replay measures the error of decode-step attention");
  if (options.methods.empty() || options.budgets.empty())
    throw Error(ErrorKind::kUsage, "replay needs at least one method and one budget");
  ConfiguredRuns c;
  for (const MethodSpec& spec : options.methods) {
    c.methods.push_back(ref::make_method(spec));
    if (options.backend == opt::Backend::kCpu)
      c.backends.push_back(opt::make_cpu_method(spec));
    else if (options.backend == opt::Backend::kCuda)
      c.backends.push_back(opt::make_cuda_method(spec));
    else
      c.backends.push_back(nullptr);
  }
  for (std::size_t mi = 0; mi < c.methods.size(); ++mi)
    for (const Budget& b : options.budgets) {
      const auto& m = c.methods[mi];
      const std::int64_t tokens = b.resolve(meta.prompt_len);
      m->protected_tokens(meta.prompt_len, tokens);
      c.runs.push_back({m.get(), c.backends[mi].get(), tokens});
      RunSummary s;
      s.label = options.methods[mi].to_string();
      s.method = m->name();
      s.budget = b.label();
      s.budget_tokens = tokens;
      s.backend = opt::backend_name(options.backend);
      s.per_layer_head.resize(static_cast<std::size_t>(meta.layers * meta.q_heads));
      s.per_step.resize(static_cast<std::size_t>(meta.decode_steps));
      c.summaries.push_back(std::move(s));
    }
  return c;
}

}  // namespace

void check_replay_options(const TraceMeta& meta, const ReplayOptions& options) { configure_runs(meta, options); }

ReplayResult run_replay(const traces::TraceReader& trace, const ReplayOptions& options, RecordSink* sink,
                        traces::PlanDumpWriter* dump) {
  return run_replay(trace.meta(), [&trace](int l) { return trace.read_layer(l); }, options, sink, dump);
}

ReplayResult run_replay(const TraceMeta& trace_meta, const LayerSource& read_layer, const ReplayOptions& options,
                        RecordSink* sink, traces::PlanDumpWriter* dump) {
  ReplayResult result;
  result.meta = trace_meta;
  const TraceMeta& meta = result.meta;
  ConfiguredRuns configured = configure_runs(meta, options);
  const auto& runs = configured.runs;
  result.runs = std::move(configured.summaries);

  // Layers from a LayerSource did not necessarily pass the reader: same shape
  // and NaN/Inf rules (a linear pass, small next to the attention).
  auto read_checked = [&](int l) {
    LayerData data = read_layer(l);
    traces::check_layer(meta, data, "layer " + std::to_string(l));
    return data;
  };
  const std::int64_t row_bytes = 2LL * meta.head_dim * dtype_bytes(meta.dtype);  // one K row + one V row
  // Layer-coupled methods see every layer before their first prefill: one
  // extra read of the trace, only when such a method is in the run.
  // A backend run's prefill is the backend's, so its first pass is too.
  std::vector<std::unique_ptr<ref::LayerCoupling>> couplings;
  std::vector<std::unique_ptr<opt::BackendCoupling>> backend_couplings;
  for (const auto& r : runs) {
    couplings.push_back(r.backend ? nullptr : r.method->coupling(meta, r.budget));
    backend_couplings.push_back(r.backend ? r.backend->coupling(meta, r.budget) : nullptr);
  }
  const auto any = [](const auto& v) { return std::any_of(v.begin(), v.end(), [](const auto& c) { return c != nullptr; }); };
  if (any(couplings) || any(backend_couplings))
    for (int l = 0; l < meta.layers; ++l) {
      const LayerData data = read_checked(l);
      if (any(couplings)) {
        const ref::LayerInput in = make_layer_input(meta, l, data);
        for (auto& c : couplings)
          if (c) c->observe(in);
      }
      if (any(backend_couplings)) {
        const opt::LayerStorage storage = opt::pack_layer(meta, l, data);
        for (auto& c : backend_couplings)
          if (c) c->observe(storage);
      }
    }

  for (int l = 0; l < meta.layers; ++l) {
    const LayerData data = read_checked(l);
    ref::LayerInput in = make_layer_input(meta, l, data);
    const FullLayer full = full_layer(meta, data, result.self_check);
    std::optional<opt::LayerStorage> storage;
    if (options.backend != opt::Backend::kReference) storage = opt::pack_layer(meta, l, data);
    for (std::size_t r = 0; r < runs.size(); ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      RunSummary& summary = result.runs[r];
      in.coupling = couplings[r].get();
      if (storage) storage->coupling = backend_couplings[r].get();
      LayerRun run(meta, l, *runs[r].method, runs[r].backend, runs[r].budget, static_cast<int>(r), summary, sink);
      std::vector<HeadCache> caches = run.prefill(in, storage ? &*storage : nullptr, full, dump);
      run.decode(in, full, caches);
      for (int h = 0; h < meta.kv_heads; ++h) {
        summary.final_kv_bytes += caches[static_cast<std::size_t>(h)].plan.slots() * row_bytes;
        summary.full_kv_bytes += (meta.prompt_len + meta.decode_steps) * row_bytes;
        if (dump) dump->add(summary.method, summary.budget, l, h, "final", caches[static_cast<std::size_t>(h)].plan);
      }
      summary.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  }
  return result;
}

}  // namespace kvscope::replay
