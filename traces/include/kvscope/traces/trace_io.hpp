// HDF5 trace schema v1 (docs/trace-format.md): a writer, and a validating
// reader that checks every attribute, rank, dimension, dtype, layout and filter
// against the schema and size limits before any data is read. Every problem
// is an Error: kTraceInvalid (schema), kIo (cannot open/read/write), kBadNumber
// (NaN/Inf in the data, with its location).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvscope/core/trace_data.hpp"

namespace kvscope::traces {

inline constexpr const char* kSchemaName = "kvscope.trace";
inline constexpr int kSchemaVersion = 1;

struct WriteOptions {
  bool deflate = false;         // shuffle + deflate (level below); off: 16-bit floats compress poorly
  int deflate_level = 1;
  bool fletcher32 = true;       // checksum every chunk
  std::int64_t chunk_bytes = 512 * 1024;  // target chunk size; chunks span whole rows along tokens
};

/// Writes a trace layer by layer (so synthetic and recorded traces stream).
/// Values are rounded to meta.dtype on write. Shapes are checked against meta.
class TraceWriter {
 public:
  TraceWriter(const std::string& path, const TraceMeta& meta, WriteOptions options = {});
  ~TraceWriter();
  TraceWriter(const TraceWriter&) = delete;
  TraceWriter& operator=(const TraceWriter&) = delete;

  void write_layer(int layer, const LayerData& data);
  /// Flushes and closes; throws if a layer was never written.
  void close();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Size limits a file must respect before anything is allocated.
struct ReadLimits {
  int max_layers = 512;
  int max_heads = 512;
  int max_head_dim = 1024;
  std::int64_t max_prompt = std::int64_t{1} << 21;   // 2M tokens
  std::int64_t max_decode = std::int64_t{1} << 20;
  std::int64_t max_layer_bytes = std::int64_t{16} << 30;  // decoded fp32 bytes of one layer
};

/// Opens and validates a trace; layers are read (and checked for NaN/Inf) on demand.
class TraceReader {
 public:
  explicit TraceReader(const std::string& path, ReadLimits limits = {});
  /// Same, from an in-memory file image (fuzzing; the bytes must outlive the reader).
  static TraceReader from_memory(std::span<const std::byte> image, ReadLimits limits = {});
  ~TraceReader();
  TraceReader(TraceReader&&) noexcept;
  TraceReader& operator=(TraceReader&&) noexcept;

  const TraceMeta& meta() const;
  LayerData read_layer(int layer) const;

 private:
  struct Impl;
  explicit TraceReader(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// Checks one in-memory layer against `meta` as the writer and reader do:
/// every dataset present exactly when the metadata says, of the exact shape,
/// every value finite and attn_colsum >= 0. Throws kTraceInvalid (shape) or
/// kBadNumber naming `label`, the dataset and the element.
void check_layer(const TraceMeta& meta, const LayerData& data, const std::string& label);

/// Convenience: writes all layers at once.
void write_trace(const std::string& path, const TraceMeta& meta, const std::vector<LayerData>& layers,
                 WriteOptions options = {});

}  // namespace kvscope::traces
