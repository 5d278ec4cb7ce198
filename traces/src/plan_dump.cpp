// Plan dumps (layout in plan_dump.hpp and docs/trace-format.md). Plans are
// small (slots <= tokens), so datasets are contiguous and uncompressed. The
// reader applies the same hardening as the trace reader: hard links only,
// exact int64/float64 types, sizes bounded before allocation, CSR structure
// checked before a Plan is returned.
#include "kvscope/traces/plan_dump.hpp"

#include <algorithm>
#include <charconv>
#include <map>
#include <optional>

#include "h5_util.hpp"

namespace kvscope::traces {
namespace {

using detail::h5_check;
using detail::h5_own;
using detail::H5Id;
using detail::ObjectKind;

constexpr const char* kRunsGroup = "runs";
constexpr const char* kStages[] = {"prefill", "final"};
constexpr std::int64_t kMaxEntries = std::int64_t{1} << 28;  // per dataset
constexpr std::size_t kMaxMembers = 1 << 20;                 // per group

const char* mode_name(PositionMode m) { return m == PositionMode::kRerotated ? "rerotated" : "original"; }

int stage_rank(const std::string& stage) {
  for (int i = 0; i < 2; ++i)
    if (stage == kStages[i]) return i;
  return -1;
}

// The one rule set for a plan's CSR structure; `fail` words the error.
template <class Fail>
void check_plan(const Plan& p, Fail fail) {
  if (p.n < 0) fail("n = " + std::to_string(p.n) + " is negative");
  if (p.row_ptr.empty() || p.row_ptr.front() != 0) fail("row_ptr must start at 0");
  for (std::size_t i = 1; i < p.row_ptr.size(); ++i)
    if (p.row_ptr[i] < p.row_ptr[i - 1]) fail("row_ptr decreases at slot " + std::to_string(i - 1));
  if (p.row_ptr.back() != p.nnz())
    fail("row_ptr ends at " + std::to_string(p.row_ptr.back()) + " but there are " + std::to_string(p.nnz()) + " entries");
  if (static_cast<std::int64_t>(p.coef_k.size()) != p.nnz() || static_cast<std::int64_t>(p.coef_v.size()) != p.nnz())
    fail("coef_k/coef_v lengths differ from the " + std::to_string(p.nnz()) + " entries");
  if (static_cast<std::int64_t>(p.position.size()) != p.slots() || static_cast<std::int64_t>(p.count.size()) != p.slots())
    fail("position/count lengths differ from the " + std::to_string(p.slots()) + " slots");
  for (std::size_t e = 0; e < p.token.size(); ++e)
    if (p.token[e] < 0 || p.token[e] >= p.n)
      fail("entry " + std::to_string(e) + " has token " + std::to_string(p.token[e]) + ", outside [0, n = " +
           std::to_string(p.n) + ")");
}

H5Id open_or_create_group(hid_t parent, const std::string& name, const std::string& label) {
  if (std::optional<H5Id> g = detail::open_child(parent, name, ObjectKind::kGroup, label)) return std::move(*g);
  return detail::create_group(parent, name, label);
}

template <class T>
void write_vector(hid_t group, const char* name, hid_t type, const std::vector<T>& values, const std::string& label) {
  const std::string what = label + "/" + name + ": cannot write";
  const hsize_t dims[1] = {values.size()};
  H5Id space = h5_own(H5Screate_simple(1, dims, nullptr), H5Sclose, ErrorKind::kIo, what);
  H5Id dcpl = h5_own(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, ErrorKind::kIo, what);
  h5_check(H5Pset_obj_track_times(dcpl.get(), false), ErrorKind::kIo, what);  // reproducible bytes
  H5Id dset = h5_own(H5Dcreate2(group, name, type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT), H5Dclose,
                     ErrorKind::kIo, what);
  if (!values.empty())
    h5_check(H5Dwrite(dset.get(), type, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()), ErrorKind::kIo, what);
}

// Reads a 1-D dataset of exactly `type`; size < 0 means any length up to kMaxEntries.
template <class T>
std::vector<T> read_vector(hid_t group, const char* name, hid_t type, const char* type_name, std::int64_t size,
                           const std::string& expected, const std::string& label) {
  const std::string ds_label = label + "/" + name;
  H5Id dset = detail::require_child(group, name, ObjectKind::kDataset, ds_label);
  detail::DatasetExpect expect{ds_label, type, type_name, {{size, kMaxEntries, "entries", expected}}};
  const std::vector<std::int64_t> dims = detail::check_dataset(dset.get(), expect);
  std::vector<T> out(static_cast<std::size_t>(dims[0]));
  if (!out.empty()) detail::read_raw(dset.get(), type, out.data(), ds_label);
  return out;
}

// "<prefix><digits>" -> the number, or nullopt.
std::optional<int> parse_index(const std::string& name, std::string_view prefix) {
  if (name.size() <= prefix.size() || name.size() > prefix.size() + 9 || name.compare(0, prefix.size(), prefix) != 0)
    return std::nullopt;
  int value = 0;
  const char* first = name.data() + prefix.size();
  const char* last = name.data() + name.size();
  const auto [end, ec] = std::from_chars(first, last, value);
  if (ec != std::errc() || end != last || (*first == '0' && name.size() > prefix.size() + 1)) return std::nullopt;
  return value;
}

// Members of `group` named <prefix><i>, sorted by i; anything else is an error.
std::vector<std::pair<int, std::string>> indexed_members(hid_t group, std::string_view prefix, const std::string& label) {
  std::vector<std::pair<int, std::string>> out;
  for (const std::string& name : detail::child_names(group, kMaxMembers, label)) {
    const std::optional<int> i = parse_index(name, prefix);
    if (!i) detail::throw_invalid(label + " has an unexpected member '" + name + "', expected " + std::string(prefix) + "<i>");
    out.emplace_back(*i, name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

Plan read_plan(hid_t group, const std::string& label) {
  Plan p;
  const std::string owner = label;
  p.n = detail::require_int_attr(group, "n", owner);
  const std::string mode = detail::require_string_attr(group, "position_mode", owner);
  if (mode != "original" && mode != "rerotated")
    detail::throw_invalid(owner + " attribute 'position_mode' = '" + mode + "', expected original or rerotated");
  p.positions = mode == "rerotated" ? PositionMode::kRerotated : PositionMode::kOriginal;
  p.row_ptr = read_vector<std::int64_t>(group, "row_ptr", H5T_STD_I64LE, "int64", -1, "", label);
  if (p.row_ptr.empty()) detail::throw_invalid(label + "/row_ptr is empty, expected slots + 1 entries");
  const std::int64_t nnz = p.row_ptr.back();
  if (nnz < 0 || nnz > kMaxEntries) detail::throw_invalid(label + "/row_ptr ends at " + std::to_string(nnz) + ", out of range");
  const std::string nnz_text = "row_ptr[slots] = " + std::to_string(nnz);
  const std::string slots_text = "slots = " + std::to_string(p.slots());
  p.token = read_vector<std::int64_t>(group, "token", H5T_STD_I64LE, "int64", nnz, nnz_text, label);
  p.coef_k = read_vector<double>(group, "coef_k", H5T_IEEE_F64LE, "float64", nnz, nnz_text, label);
  p.coef_v = read_vector<double>(group, "coef_v", H5T_IEEE_F64LE, "float64", nnz, nnz_text, label);
  p.position = read_vector<std::int64_t>(group, "position", H5T_STD_I64LE, "int64", p.slots(), slots_text, label);
  p.count = read_vector<std::int64_t>(group, "count", H5T_STD_I64LE, "int64", p.slots(), slots_text, label);
  check_plan(p, [&](const std::string& why) { detail::throw_invalid(label + ": " + why); });
  return p;
}

}  // namespace

struct PlanDumpWriter::Impl {
  std::string path;
  H5Id file;
  H5Id runs;
  std::map<std::pair<std::string, std::string>, int> run_index;  // (method, budget) -> i
};

PlanDumpWriter::PlanDumpWriter(const std::string& path) : impl_(std::make_unique<Impl>()) {
  detail::h5_quiet();
  impl_->path = path;
  impl_->file = h5_own(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose, ErrorKind::kIo,
                       "'" + path + "': cannot create");
  detail::write_string_attr(impl_->file.get(), "schema", kPlanSchemaName);
  detail::write_int_attr(impl_->file.get(), "schema_version", kPlanSchemaVersion);
  impl_->runs = detail::create_group(impl_->file.get(), kRunsGroup, path + ": /runs");
}

PlanDumpWriter::~PlanDumpWriter() = default;

void PlanDumpWriter::add(const std::string& method, const std::string& budget, int layer, int kv_head,
                         const std::string& stage, const Plan& plan) {
  detail::h5_quiet();
  Impl& w = *impl_;
  if (!w.file.valid()) throw Error(ErrorKind::kUsage, w.path + ": plan dump add after close");
  if (stage_rank(stage) < 0) throw Error(ErrorKind::kUsage, "plan dump stage '" + stage + "' is not prefill or final");
  if (layer < 0 || kv_head < 0) throw Error(ErrorKind::kUsage, "plan dump layer and kv_head must be >= 0");
  const std::string key = method + " / " + budget + " layer " + std::to_string(layer) + " kv_head " +
                          std::to_string(kv_head) + " " + stage;
  check_plan(plan, [&](const std::string& why) { throw Error(ErrorKind::kInvariant, "plan " + key + ": " + why); });

  const auto [it, is_new] = w.run_index.try_emplace({method, budget}, static_cast<int>(w.run_index.size()));
  const std::string run_name = "run_" + std::to_string(it->second);
  std::string label = w.path + ": /runs/" + run_name;
  H5Id run = open_or_create_group(w.runs.get(), run_name, label);
  if (is_new) {
    detail::write_string_attr(run.get(), "method", method);
    detail::write_string_attr(run.get(), "budget", budget);
  }
  const std::string layer_name = "layer_" + std::to_string(layer);
  const std::string head_name = "kv_head_" + std::to_string(kv_head);
  H5Id layer_group = open_or_create_group(run.get(), layer_name, label += "/" + layer_name);
  H5Id head_group = open_or_create_group(layer_group.get(), head_name, label += "/" + head_name);
  label += "/" + stage;
  if (H5Lexists(head_group.get(), stage.c_str(), H5P_DEFAULT) > 0)
    throw Error(ErrorKind::kUsage, "plan " + key + " was already dumped");
  H5Id g = detail::create_group(head_group.get(), stage, label);
  detail::write_int_attr(g.get(), "n", plan.n);
  detail::write_string_attr(g.get(), "position_mode", mode_name(plan.positions));
  write_vector(g.get(), "row_ptr", H5T_STD_I64LE, plan.row_ptr, label);
  write_vector(g.get(), "token", H5T_STD_I64LE, plan.token, label);
  write_vector(g.get(), "coef_k", H5T_IEEE_F64LE, plan.coef_k, label);
  write_vector(g.get(), "coef_v", H5T_IEEE_F64LE, plan.coef_v, label);
  write_vector(g.get(), "position", H5T_STD_I64LE, plan.position, label);
  write_vector(g.get(), "count", H5T_STD_I64LE, plan.count, label);
}

void PlanDumpWriter::close() {
  detail::h5_quiet();
  Impl& w = *impl_;
  if (!w.file.valid()) return;
  (void)w.runs.close();
  h5_check(w.file.close(), ErrorKind::kIo, "'" + w.path + "': cannot close (flush) the file");
}

std::vector<PlanDumpRecord> read_plan_dumps(const std::string& path) {
  H5Id file = detail::open_file_readonly(path);
  const std::string owner = path + ": root";
  const std::string schema = detail::require_string_attr(file.get(), "schema", owner);
  if (schema != kPlanSchemaName)
    detail::throw_invalid(owner + " attribute 'schema' = '" + schema + "', expected '" + kPlanSchemaName + "'");
  const std::int64_t version = detail::require_int_attr(file.get(), "schema_version", owner);
  if (version != kPlanSchemaVersion)
    detail::throw_invalid(owner + " attribute 'schema_version' = " + std::to_string(version) + " is not supported");
  H5Id runs = detail::require_child(file.get(), kRunsGroup, ObjectKind::kGroup, path + ": /runs");

  std::vector<PlanDumpRecord> out;
  for (const auto& [run_i, run_name] : indexed_members(runs.get(), "run_", path + ": /runs")) {
    const std::string run_label = path + ": /runs/" + run_name;
    H5Id run = detail::require_child(runs.get(), run_name, ObjectKind::kGroup, run_label);
    const std::string method = detail::require_string_attr(run.get(), "method", run_label);
    const std::string budget = detail::require_string_attr(run.get(), "budget", run_label);
    for (const auto& [layer, layer_name] : indexed_members(run.get(), "layer_", run_label)) {
      const std::string layer_label = run_label + "/" + layer_name;
      H5Id lg = detail::require_child(run.get(), layer_name, ObjectKind::kGroup, layer_label);
      for (const auto& [head, head_name] : indexed_members(lg.get(), "kv_head_", layer_label)) {
        const std::string head_label = layer_label + "/" + head_name;
        H5Id hg = detail::require_child(lg.get(), head_name, ObjectKind::kGroup, head_label);
        std::vector<std::string> stages = detail::child_names(hg.get(), kMaxMembers, head_label);
        for (const std::string& s : stages)
          if (stage_rank(s) < 0) detail::throw_invalid(head_label + " has an unexpected member '" + s + "'");
        std::sort(stages.begin(), stages.end(), [](const auto& a, const auto& b) { return stage_rank(a) < stage_rank(b); });
        for (const std::string& stage : stages) {
          const std::string label = head_label + "/" + stage;
          H5Id sg = detail::require_child(hg.get(), stage, ObjectKind::kGroup, label);
          out.push_back({method, budget, stage, layer, head, read_plan(sg.get(), label)});
        }
      }
    }
  }
  return out;
}

}  // namespace kvscope::traces
