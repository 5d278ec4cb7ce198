#include "sweep_comm.hpp"

#include <cstdlib>

#include "kvscope/core/error.hpp"

#ifdef KVSCOPE_HAVE_MPI
#include <mpi.h>
#endif

namespace kvscope::cli {
namespace {

/// World size announced by the launcher (Open MPI, MPICH/Hydra, Slurm-PMI), 0 when none.
int launcher_world_size() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
    if (const char* v = std::getenv(var); v && *v) return std::atoi(v);
  return 0;
}

class SingleRank final : public SweepComm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_size() const override { return 1; }
  std::string broadcast(const std::string& text) override { return text; }
  std::vector<std::string> gather(const std::string& text) override { return {text}; }
};

#ifdef KVSCOPE_HAVE_MPI
void check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) throw Error(ErrorKind::kInternal, std::string("MPI call failed: ") + what);
}

class MpiRanks final : public SweepComm {
 public:
  MpiRanks() {
    int provided = 0;
    check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    check(MPI_Comm_rank(MPI_COMM_WORLD, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(MPI_COMM_WORLD, &size_), "MPI_Comm_size");
    MPI_Comm node;
    check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node), "MPI_Comm_split_type");
    check(MPI_Comm_size(node, &local_size_), "MPI_Comm_size");
    MPI_Comm_free(&node);
  }
  ~MpiRanks() override { MPI_Finalize(); }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_size() const override { return local_size_; }

  std::string broadcast(const std::string& text) override {
    long long n = rank_ == 0 ? static_cast<long long>(text.size()) : 0;
    check(MPI_Bcast(&n, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD), "MPI_Bcast");
    std::string out = rank_ == 0 ? text : std::string(static_cast<std::size_t>(n), '\0');
    if (n > 0) check(MPI_Bcast(out.data(), static_cast<int>(n), MPI_CHAR, 0, MPI_COMM_WORLD), "MPI_Bcast");
    return out;
  }

  std::vector<std::string> gather(const std::string& text) override {
    int n = static_cast<int>(text.size());
    std::vector<int> sizes(static_cast<std::size_t>(rank_ == 0 ? size_ : 0));
    check(MPI_Gather(&n, 1, MPI_INT, sizes.data(), 1, MPI_INT, 0, MPI_COMM_WORLD), "MPI_Gather");
    std::vector<int> offsets(sizes.size());
    int total = 0;
    for (std::size_t r = 0; r < sizes.size(); ++r) {
      offsets[r] = total;
      total += sizes[r];
    }
    std::string all(static_cast<std::size_t>(total), '\0');
    check(MPI_Gatherv(text.data(), n, MPI_CHAR, all.data(), sizes.data(), offsets.data(), MPI_CHAR, 0, MPI_COMM_WORLD),
          "MPI_Gatherv");
    std::vector<std::string> parts;
    for (std::size_t r = 0; r < sizes.size(); ++r)
      parts.push_back(all.substr(static_cast<std::size_t>(offsets[r]), static_cast<std::size_t>(sizes[r])));
    return parts;
  }

 private:
  int rank_ = 0, size_ = 1, local_size_ = 1;
};
#endif

}  // namespace

std::unique_ptr<SweepComm> make_sweep_comm() {
  const int launched = launcher_world_size();
#ifdef KVSCOPE_HAVE_MPI
  if (launched > 0) return std::make_unique<MpiRanks>();
#else
  if (launched > 1)
    throw Error(ErrorKind::kUsage, "launched as " + std::to_string(launched) +
                                       " MPI ranks, but this kvscope was built without MPI (install libopenmpi-dev "
                                       "and rebuild); every rank would run every cell");
#endif
  return std::make_unique<SingleRank>();
}

}  // namespace kvscope::cli
