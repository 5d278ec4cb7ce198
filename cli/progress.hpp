// Progress of a long command on stderr: a redrawn bar on a terminal, one line
// per finished item otherwise (logs stay readable).
#pragma once

#include <chrono>
#include <cstddef>
#include <string>

namespace kvscope::cli {

class Progress {
 public:
  /// `total` items of which `already` were done before this run (resumed).
  Progress(std::size_t total, std::size_t already, std::string prefix = "");
  /// One more item finished; `what` names it.
  void advance(const std::string& what);
  /// Ends the bar's line (terminal only).
  void finish();

 private:
  std::size_t total_, done_;
  std::size_t started_with_;
  std::string prefix_;
  bool tty_;
  std::chrono::steady_clock::time_point start_;
};

/// "1h02m", "3m05s", "12.3s".
std::string format_duration(double seconds);

}  // namespace kvscope::cli
