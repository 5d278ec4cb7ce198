// The trace reader on arbitrary bytes (an in-memory HDF5 image): opening and
// reading every layer must end in a value or a kvscope::Error, never a crash,
// a hang or an allocation the limits did not allow. Crashes inside libhdf5
// itself go to the ledger in docs/robustness.md.
#include <cstddef>
#include <cstdint>
#include <span>

#include "kvscope/core/error.hpp"
#include "kvscope/traces/trace_io.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Tight limits: a fuzzed file must not make the reader allocate more than a
  // few MiB (the default limits are sized for real traces).
  kvscope::traces::ReadLimits limits;
  limits.max_layers = 64;
  limits.max_layer_bytes = std::int64_t{16} << 20;
  try {
    const auto reader = kvscope::traces::TraceReader::from_memory(
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(data), size), limits);
    for (int l = 0; l < reader.meta().layers; ++l) (void)reader.read_layer(l);
  } catch (const kvscope::Error&) {
    // The expected way to reject a bad file. Anything else escapes and is a finding.
  }
  return 0;
}
