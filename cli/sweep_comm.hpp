// The ranks of a sweep. Under `mpirun` (and a kvscope built with MPI) every
// rank runs its share of the cells and rank 0 gathers the results; otherwise
// there is one rank. Only the calling (main) thread talks to MPI.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace kvscope::cli {

class SweepComm {
 public:
  virtual ~SweepComm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// Ranks on this machine (they share its cores).
  virtual int local_size() const = 0;
  /// Rank 0's `text` on every rank.
  virtual std::string broadcast(const std::string& text) = 0;
  /// Every rank's `text` on rank 0 (in rank order); empty elsewhere.
  virtual std::vector<std::string> gather(const std::string& text) = 0;
};

/// MPI when launched by an MPI launcher, one rank otherwise. Throws
/// Error(kUsage) when launched as several ranks by a kvscope built without MPI
/// (each would run every cell).
std::unique_ptr<SweepComm> make_sweep_comm();

}  // namespace kvscope::cli
