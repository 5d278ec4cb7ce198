#include "kvscope/replay/report.hpp"

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "kvscope/core/error.hpp"

namespace kvscope::replay {
namespace {

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

nlohmann::json aggregate_json(const Aggregate& a) {
  nlohmann::json j;
  j["count"] = a.count;
  j["mean_rel_l2"] = a.mean_rel_l2();
  j["max_rel_l2"] = a.max_rel_l2;
  j["mean_cosine"] = a.mean_cosine();
  j["min_cosine"] = a.min_cosine;
  j["mean_mass_lost"] = a.mean_mass_lost();
  j["max_mass_lost"] = a.max_mass_lost;
  j["mean_tv"] = std::isnan(a.mean_tv()) ? nlohmann::json(nullptr) : nlohmann::json(a.mean_tv());
  j["mean_kept_fraction"] = a.mean_kept_fraction();
  j["max_err_over_bound"] = a.max_bound_ratio;
  return j;
}

}  // namespace

void write_table(std::ostream& os, const ReplayResult& r) {
  const TraceMeta& m = r.meta;
  os << "trace: " << m.model << "  layers " << m.layers << "  q/kv heads " << m.q_heads << "/" << m.kv_heads
     << "  d " << m.head_dim << "  prompt " << m.prompt_len << "  decode " << m.decode_steps << "  "
     << dtype_name(m.dtype) << "\n";
  if (r.self_check.recorded)
    os << "trace self-check: recorded outputs vs full-cache reference, max rel-L2 "
       << fmt("%.2e", r.self_check.max_rel_l2) << "\n";
  os << "error of decode-step attention outputs vs the full cache (mean over layers, q heads, steps)\n\n";
  char line[512];
  std::snprintf(line, sizeof line, "%-44s %7s %7s %10s %10s %9s %9s %10s %9s %9s %9s %7s\n", "method", "budget", "kept",
                "relL2 mean", "relL2 max", "cos mean", "cos min", "mass lost", "TV mean", "err/bound", "KV MiB", "checks");
  os << line;
  for (const RunSummary& s : r.runs) {
    std::string name = s.label.size() > 44 ? s.label.substr(0, 41) + "..." : s.label;
    const double tv = s.all.mean_tv();
    std::snprintf(line, sizeof line, "%-44s %7s %6.1f%% %10.3e %10.3e %9.6f %9.6f %10.3e %9s %9.3f %9.3f %7lld\n",
                  name.c_str(), s.budget.c_str(), 100.0 * s.all.mean_kept_fraction(), s.all.mean_rel_l2(),
                  s.all.max_rel_l2, s.all.mean_cosine(), s.all.min_cosine, s.all.mean_mass_lost(),
                  std::isnan(tv) ? "-" : fmt("%.3e", tv).c_str(), s.all.max_bound_ratio,
                  static_cast<double>(s.final_kv_bytes) / (1 << 20),
                  static_cast<long long>(s.plans_checked));
    os << line;
  }
}

nlohmann::json trace_json(const TraceMeta& m) {
  return {{"model", m.model},           {"producer", m.producer},       {"layers", m.layers},
          {"q_heads", m.q_heads},       {"kv_heads", m.kv_heads},       {"head_dim", m.head_dim},
          {"prompt_len", m.prompt_len}, {"decode_steps", m.decode_steps}, {"dtype", dtype_name(m.dtype)}};
}

nlohmann::json run_json(const RunSummary& s, const TraceMeta& m) {
  nlohmann::json run;
  run["method"] = s.label;
  run["resolved"] = s.method;
  run["budget"] = s.budget;
  run["budget_tokens"] = s.budget_tokens;
  run["backend"] = s.backend;
  run["summary"] = aggregate_json(s.all);
  run["final_kv_bytes"] = s.final_kv_bytes;
  run["full_kv_bytes"] = s.full_kv_bytes;
  run["plans_checked"] = s.plans_checked;
  run["seconds"] = s.seconds;
  nlohmann::json grid = nlohmann::json::array();
  for (int l = 0; l < m.layers; ++l) {
    nlohmann::json row = nlohmann::json::array();
    for (int h = 0; h < m.q_heads; ++h)
      row.push_back(s.per_layer_head[static_cast<std::size_t>(l * m.q_heads + h)].mean_rel_l2());
    grid.push_back(row);
  }
  run["mean_rel_l2_by_layer_head"] = grid;
  nlohmann::json steps = nlohmann::json::array();
  for (const Aggregate& a : s.per_step) steps.push_back(a.mean_rel_l2());
  run["mean_rel_l2_by_step"] = steps;
  return run;
}

void write_json(std::ostream& os, const ReplayResult& r) {
  nlohmann::json j;
  j["trace"] = trace_json(r.meta);
  j["self_check"] = {{"recorded", r.self_check.recorded}, {"max_rel_l2", r.self_check.max_rel_l2}};
  j["runs"] = nlohmann::json::array();
  for (const RunSummary& s : r.runs) j["runs"].push_back(run_json(s, r.meta));
  os << j.dump(2) << "\n";
}

void write_summary_csv(std::ostream& os, const ReplayResult& r) {
  os << "method,resolved,budget,budget_tokens,steps,mean_kept_fraction,mean_rel_l2,max_rel_l2,mean_cosine,min_cosine,"
        "mean_mass_lost,max_mass_lost,mean_tv,final_kv_bytes,full_kv_bytes,plans_checked,seconds\n";
  for (const RunSummary& s : r.runs) {
    const double tv = s.all.mean_tv();
    os << '"' << s.label << "\",\"" << s.method << "\"," << s.budget << ',' << s.budget_tokens << ',' << s.all.count << ','
       << s.all.mean_kept_fraction() << ',' << s.all.mean_rel_l2() << ',' << s.all.max_rel_l2 << ','
       << s.all.mean_cosine() << ',' << s.all.min_cosine << ',' << s.all.mean_mass_lost() << ','
       << s.all.max_mass_lost << ',';
    if (!std::isnan(tv)) os << tv;  // empty: TV is undefined for merging plans
    os << ','
       << s.final_kv_bytes << ',' << s.full_kv_bytes << ',' << s.plans_checked << ',' << s.seconds << '\n';
  }
}

CsvRecordSink::CsvRecordSink(const std::string& path) : out_(path) {
  if (!out_) throw Error(ErrorKind::kIo, "cannot write '" + path + "'");
  out_.precision(9);
  out_ << "run,layer,q_head,step,slots,rel_l2,cosine,mass_lost,tv,err,bound\n";
}

void CsvRecordSink::on_record(const StepRecord& r) {
  out_ << r.run << ',' << r.layer << ',' << r.q_head << ',' << r.step << ',' << r.slots << ',' << r.metrics.rel_l2
       << ',' << r.metrics.cosine << ',' << r.metrics.mass_lost << ',';
  if (!std::isnan(r.metrics.tv)) out_ << r.metrics.tv;
  out_ << ',' << r.metrics.err << ',' << r.metrics.bound << '\n';
}

}  // namespace kvscope::replay
