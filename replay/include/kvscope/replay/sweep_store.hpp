// Where a sweep keeps its cells (docs/sweep.md). The results file OUT is one
// JSON document, written atomically (temporary file + rename) with a CSV twin;
// while the sweep runs, each finished cell is also appended as one JSON line to
// a journal (OUT.journal-<rank>), flushed at once, so a killed sweep loses only
// the cells that were running. Resuming reads OUT and every journal beside it.
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace kvscope::replay {

/// Every finished cell stored at `out` (the file and its journals), first
/// occurrence of each key kept, in file order. Missing files are no cells; a
/// file that is not a sweep result, or a journal line that is not a cell (but
/// for a torn last line, which a kill can leave), throws Error(kIo) naming it.
std::vector<nlohmann::json> load_finished_cells(const std::string& out);

/// Appends finished cells to OUT.journal-<rank>.
class SweepJournal {
 public:
  SweepJournal(const std::string& out, int rank);
  void append(const nlohmann::json& cell);

 private:
  std::string path_;
  std::ofstream file_;
};

/// Writes OUT ({"format": "kvscope-sweep", "version": 1, "complete", "cells"})
/// and its CSV twin (sweep_csv_path), each atomically.
void write_sweep_results(const std::string& out, const std::vector<nlohmann::json>& cells, bool complete);

/// OUT with its extension replaced by .csv (OUT.csv when it has none).
std::string sweep_csv_path(const std::string& out);

/// Removes OUT's journals (after their cells are in OUT).
void remove_sweep_journals(const std::string& out);

}  // namespace kvscope::replay
