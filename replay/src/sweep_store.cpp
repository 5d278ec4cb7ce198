#include "kvscope/replay/sweep_store.hpp"

#include <algorithm>
#include <filesystem>
#include <set>
#include <sstream>

#include "kvscope/core/error.hpp"
#include "kvscope/replay/sweep.hpp"

namespace kvscope::replay {
namespace {

namespace fs = std::filesystem;
constexpr const char* kFormat = "kvscope-sweep";
constexpr int kVersion = 1;

std::string journal_prefix(const std::string& out) { return fs::path(out).filename().string() + ".journal-"; }

fs::path parent_or_dot(const std::string& out) {
  const fs::path p = fs::path(out).parent_path();
  return p.empty() ? fs::path(".") : p;
}

std::vector<fs::path> journals_of(const std::string& out) {
  std::vector<fs::path> found;
  std::error_code ec;
  const std::string prefix = journal_prefix(out);
  for (const auto& entry : fs::directory_iterator(parent_or_dot(out), ec))
    if (entry.path().filename().string().rfind(prefix, 0) == 0) found.push_back(entry.path());
  std::sort(found.begin(), found.end());
  return found;
}

/// Throws Error(kIo) unless `cell` has every field the CSV and the report read.
void check_cell(const nlohmann::json& cell, const std::string& where) {
  const auto need = [&](const nlohmann::json& obj, const char* name, bool (nlohmann::json::*is)() const noexcept,
                        bool nullable = false) {
    if (!obj.is_object() || !obj.contains(name) || !((obj[name].*is)() || (nullable && obj[name].is_null())))
      throw Error(ErrorKind::kIo, where + ": a cell's field '" + name + "' is missing or of the wrong type");
  };
  using J = nlohmann::json;
  need(cell, "trace", &J::is_object);
  need(cell["trace"], "path", &J::is_string);
  need(cell["trace"], "model", &J::is_string);
  need(cell["trace"], "prompt_len", &J::is_number_integer);
  for (const char* f : {"method", "resolved", "budget", "backend"}) need(cell, f, &J::is_string);
  for (const char* f : {"budget_tokens", "final_kv_bytes", "full_kv_bytes", "plans_checked"})
    need(cell, f, &J::is_number_integer);
  need(cell, "seconds", &J::is_number);
  need(cell, "summary", &J::is_object);
  need(cell["summary"], "count", &J::is_number_integer);
  for (const char* f : {"mean_kept_fraction", "mean_rel_l2", "max_rel_l2", "mean_cosine", "min_cosine",
                        "mean_mass_lost", "max_mass_lost", "max_err_over_bound"})
    need(cell["summary"], f, &J::is_number);
  need(cell["summary"], "mean_tv", &J::is_number, /*nullable=*/true);
}

/// Adds a checked `cell` unless a cell with its key is there already.
void keep_first(std::vector<nlohmann::json>& cells, std::set<std::string>& keys, nlohmann::json cell,
                const std::string& where) {
  check_cell(cell, where);
  if (keys.insert(stored_cell_key(cell)).second) cells.push_back(std::move(cell));
}

std::string csv_quote(const std::string& s) {
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

/// Writes `text` to `path` through a temporary file and a rename: readers see the old file or the new one.
void write_atomically(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw Error(ErrorKind::kIo, "cannot write '" + tmp.string() + "'");
    f << text;
    f.flush();
    if (!f) throw Error(ErrorKind::kIo, "cannot write '" + tmp.string() + "'");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw Error(ErrorKind::kIo, "cannot replace '" + path.string() + "': " + ec.message());
}

std::string cells_csv(const std::vector<nlohmann::json>& cells) {
  std::ostringstream os;
  os.precision(9);
  os << "trace,model,method,resolved,budget,budget_tokens,prompt_len,backend,steps,mean_kept_fraction,mean_rel_l2,"
        "max_rel_l2,mean_cosine,min_cosine,mean_mass_lost,max_mass_lost,mean_tv,max_err_over_bound,final_kv_bytes,"
        "full_kv_bytes,plans_checked,seconds\n";
  for (const nlohmann::json& c : cells) {
    const nlohmann::json& t = c["trace"];
    const nlohmann::json& s = c["summary"];
    os << csv_quote(t["path"].get<std::string>()) << ',' << csv_quote(t["model"].get<std::string>()) << ','
       << csv_quote(c["method"].get<std::string>()) << ',' << csv_quote(c["resolved"].get<std::string>()) << ','
       << c["budget"].get<std::string>() << ',' << c["budget_tokens"] << ',' << t["prompt_len"] << ','
       << c["backend"].get<std::string>() << ',' << s["count"];
    for (const char* f : {"mean_kept_fraction", "mean_rel_l2", "max_rel_l2", "mean_cosine", "min_cosine",
                          "mean_mass_lost", "max_mass_lost", "mean_tv", "max_err_over_bound"}) {
      os << ',';
      if (!s[f].is_null()) os << s[f].get<double>();  // empty: TV is undefined for merging plans
    }
    os << ',' << c["final_kv_bytes"] << ',' << c["full_kv_bytes"] << ',' << c["plans_checked"] << ','
       << c["seconds"].get<double>() << '\n';
  }
  return os.str();
}

}  // namespace

std::vector<nlohmann::json> load_finished_cells(const std::string& out) {
  std::vector<nlohmann::json> cells;
  std::set<std::string> keys;
  if (fs::exists(out)) {
    std::ifstream f(out);
    if (!f) throw Error(ErrorKind::kIo, "cannot read '" + out + "'");
    const nlohmann::json doc = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
    if (doc.is_discarded() || !doc.is_object() || doc.value("format", "") != kFormat || !doc.contains("cells") ||
        !doc["cells"].is_array())
      throw Error(ErrorKind::kIo, "'" + out + "' exists and is not a kvscope sweep result file (choose another --out)");
    if (doc.value("version", 0) != kVersion)
      throw Error(ErrorKind::kIo, "'" + out + "' is sweep format version " + doc.value("version", nlohmann::json()).dump() +
                                      "; this kvscope reads version " + std::to_string(kVersion));
    for (const nlohmann::json& c : doc["cells"]) keep_first(cells, keys, c, "'" + out + "'");
  }
  for (const fs::path& j : journals_of(out)) {
    std::ifstream f(j);
    if (!f) throw Error(ErrorKind::kIo, "cannot read '" + j.string() + "'");
    std::string line;
    for (int n = 1; std::getline(f, line); ++n) {
      nlohmann::json c = nlohmann::json::parse(line, nullptr, false);
      if (c.is_discarded()) {
        if (f.peek() == std::char_traits<char>::eof()) break;  // torn last line: its cell reruns
        throw Error(ErrorKind::kIo, "'" + j.string() + "' line " + std::to_string(n) + " is not JSON");
      }
      keep_first(cells, keys, std::move(c), "'" + j.string() + "' line " + std::to_string(n));
    }
  }
  return cells;
}

SweepJournal::SweepJournal(const std::string& out, int rank)
    : path_((parent_or_dot(out) / (journal_prefix(out) + std::to_string(rank))).string()),
      file_(path_, std::ios::app) {
  if (!file_) throw Error(ErrorKind::kIo, "cannot write the sweep journal '" + path_ + "'");
}

void SweepJournal::append(const nlohmann::json& cell) {
  file_ << cell.dump() << '\n';
  file_.flush();
  if (!file_) throw Error(ErrorKind::kIo, "cannot write the sweep journal '" + path_ + "'");
}

void write_sweep_results(const std::string& out, const std::vector<nlohmann::json>& cells, bool complete) {
  // One cell per line: diffable, greppable, and still one JSON document.
  std::string text = std::string("{\"format\": \"") + kFormat + "\", \"version\": " + std::to_string(kVersion) +
                     ", \"complete\": " + (complete ? "true" : "false") + ", \"cells\": [";
  for (std::size_t i = 0; i < cells.size(); ++i) text += (i ? ",\n  " : "\n  ") + cells[i].dump();
  text += "\n]}\n";
  write_atomically(out, text);
  write_atomically(sweep_csv_path(out), cells_csv(cells));
}

std::string sweep_csv_path(const std::string& out) {
  fs::path p(out);
  if (p.extension() == ".csv") return out + ".csv";  // never overwrite OUT itself
  return p.replace_extension(".csv").string();
}

void remove_sweep_journals(const std::string& out) {
  for (const fs::path& j : journals_of(out)) {
    std::error_code ec;
    fs::remove(j, ec);
  }
}

}  // namespace kvscope::replay
