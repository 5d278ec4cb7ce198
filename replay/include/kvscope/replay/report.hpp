// Result writers: the summary table, JSON and CSV forms of a ReplayResult, and
// a RecordSink streaming per-step records to CSV.
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>

#include "kvscope/replay/replay.hpp"

namespace kvscope::replay {

/// Human-readable summary: one row per (method, budget).
void write_table(std::ostream& os, const ReplayResult& result);
/// Everything: trace metadata, self-check, each run's summary, per-(layer, head) and per-step means.
void write_json(std::ostream& os, const ReplayResult& result);
/// The JSON object of a trace's metadata, and of one run (summary, per-(layer,
/// head) and per-step means): shared by `replay --format json` and sweep cells.
nlohmann::json trace_json(const TraceMeta& meta);
nlohmann::json run_json(const RunSummary& run, const TraceMeta& meta);
/// One CSV row per (method, budget).
void write_summary_csv(std::ostream& os, const ReplayResult& result);

/// Streams StepRecords to a CSV file (method and budget by run index; see summary).
class CsvRecordSink final : public RecordSink {
 public:
  explicit CsvRecordSink(const std::string& path);
  void on_record(const StepRecord& r) override;

 private:
  std::ofstream out_;
};

}  // namespace kvscope::replay
