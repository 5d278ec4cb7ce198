#include "progress.hpp"

#include <unistd.h>

#include <cstdio>

namespace kvscope::cli {

std::string format_duration(double s) {
  char buf[32];
  if (s < 60)
    std::snprintf(buf, sizeof buf, "%.1fs", s);
  else if (s < 3600)
    std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  else
    std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s) / 3600, static_cast<int>(s) % 3600 / 60);
  return buf;
}

Progress::Progress(std::size_t total, std::size_t already, std::string prefix)
    : total_(total), done_(already), started_with_(already), prefix_(std::move(prefix)),
      tty_(isatty(STDERR_FILENO) == 1), start_(std::chrono::steady_clock::now()) {}

void Progress::advance(const std::string& what) {
  ++done_;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const std::size_t ran = done_ - started_with_;
  // Remaining time from this run's own pace (resumed items took no time).
  const double eta = ran ? elapsed / static_cast<double>(ran) * static_cast<double>(total_ - done_) : 0;
  const std::string counts = prefix_ + std::to_string(done_) + "/" + std::to_string(total_);
  if (!tty_) {
    std::fprintf(stderr, "[%s] %s  (%s elapsed)\n", counts.c_str(), what.c_str(), format_duration(elapsed).c_str());
    return;
  }
  constexpr int kWidth = 30;
  const int filled = total_ ? static_cast<int>(kWidth * done_ / total_) : kWidth;
  std::string bar(static_cast<std::size_t>(filled), '#');
  bar.resize(kWidth, '.');
  std::fprintf(stderr, "\r[%s] %s  %s elapsed, eta %s  %s\033[K", bar.c_str(), counts.c_str(),
               format_duration(elapsed).c_str(), format_duration(eta).c_str(), what.c_str());
  std::fflush(stderr);
}

void Progress::finish() {
  if (tty_) std::fprintf(stderr, "\n");
}

}  // namespace kvscope::cli
