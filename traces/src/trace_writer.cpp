// Trace writer (schema v1). Every layer is checked against the metadata and
// the NaN/Inf policy before anything of it is written, and the root attributes
// are written last, by close(): an interrupted write never looks like a valid
// trace to the reader (it lacks the 'schema' attribute).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string_view>
#include <vector>

#include "h5_util.hpp"
#include "kvscope/traces/trace_io.hpp"
#include "schema.hpp"

namespace kvscope::traces {
namespace {

using detail::h5_check;
using detail::h5_own;
using detail::H5Id;

// The writer enforces the schema's rules but not a reader's size limits.
ReadLimits unlimited() {
  constexpr int kInt = std::numeric_limits<int>::max();
  constexpr std::int64_t kI64 = std::numeric_limits<std::int64_t>::max();
  return ReadLimits{kInt, kInt, kInt, kI64, kI64, kI64};
}

// Rows of `tokens` per chunk: ~chunk_bytes, at least one row, at most all.
hsize_t chunk_rows(std::int64_t tokens, std::int64_t row_bytes, std::int64_t chunk_bytes) {
  const std::int64_t target = std::min(chunk_bytes, detail::kMaxChunkBytes);
  return static_cast<hsize_t>(std::clamp<std::int64_t>(target / row_bytes, 1, tokens));
}

H5Id creation_plist(const Tensor& t, DType dtype, const WriteOptions& opt, const std::string& label) {
  const std::string what = label + ": cannot set up storage";
  H5Id dcpl = h5_own(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, ErrorKind::kIo, what);
  // No modification times in object headers: the same trace gives the same bytes.
  h5_check(H5Pset_obj_track_times(dcpl.get(), false), ErrorKind::kIo, what);
  // HDF5 cannot chunk a zero-sized axis (S = 0): such datasets stay contiguous and empty.
  if (t.size() == 0) return dcpl;
  const std::int64_t row_bytes = (t.rank() == 3 ? t.dim(2) : 1) * dtype_bytes(dtype);
  std::vector<hsize_t> chunk(t.shape.size(), 1);
  chunk[1] = chunk_rows(t.dim(1), row_bytes, opt.chunk_bytes);
  if (t.rank() == 3) chunk[2] = static_cast<hsize_t>(t.dim(2));
  h5_check(H5Pset_chunk(dcpl.get(), t.rank(), chunk.data()), ErrorKind::kIo, what);
  // Pipeline order: shuffle, deflate, then the checksum over the stored bytes.
  if (opt.deflate) {
    h5_check(H5Pset_shuffle(dcpl.get()), ErrorKind::kIo, what);
    h5_check(H5Pset_deflate(dcpl.get(), static_cast<unsigned>(opt.deflate_level)), ErrorKind::kIo, what);
  }
  if (opt.fletcher32) h5_check(H5Pset_fletcher32(dcpl.get()), ErrorKind::kIo, what);
  return dcpl;
}

// 16-bit words of `t` rounded to `dtype` (RNE); a finite value that rounds to
// Inf does not fit the dtype and would make the file unreadable.
std::vector<std::uint16_t> encode16(const Tensor& t, DType dtype, const std::string& label) {
  std::vector<std::uint16_t> bits(t.data.size());
  for (std::size_t i = 0; i < t.data.size(); ++i) {
    const float x = t.data[i];
    bits[i] = dtype == DType::kF16 ? float_to_f16_bits(x) : float_to_bf16_bits(x);
    const float back = dtype == DType::kF16 ? f16_bits_to_float(bits[i]) : bf16_bits_to_float(bits[i]);
    if (!std::isfinite(back)) {
      std::ostringstream what;
      what << label << " value " << x << " at " << schema::location(t, static_cast<std::int64_t>(i))
           << " overflows " << dtype_name(dtype);
      throw Error(ErrorKind::kBadNumber, what.str());
    }
  }
  return bits;
}

void write_dataset(hid_t group, const char* name, const Tensor& t, DType dtype, const WriteOptions& opt,
                   const std::string& label) {
  const std::string what = label + ": cannot write";
  std::vector<hsize_t> dims(t.shape.begin(), t.shape.end());
  H5Id space = h5_own(H5Screate_simple(t.rank(), dims.data(), nullptr), H5Sclose, ErrorKind::kIo, what);
  H5Id type = schema::storage_type(dtype);
  H5Id dcpl = creation_plist(t, dtype, opt, label);
  H5Id dset = h5_own(H5Dcreate2(group, name, type.get(), space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
                     H5Dclose, ErrorKind::kIo, what);
  if (t.size() == 0) return;
  if (dtype == DType::kF32) {
    h5_check(H5Dwrite(dset.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data.data()), ErrorKind::kIo, what);
  } else {
    const std::vector<std::uint16_t> bits = encode16(t, dtype, label);
    h5_check(H5Dwrite(dset.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, bits.data()), ErrorKind::kIo, what);
  }
}

}  // namespace

struct TraceWriter::Impl {
  std::string path;
  TraceMeta meta;
  WriteOptions options;
  H5Id file;
  H5Id layers;
  std::vector<bool> written;
  bool closed = false;

  std::string layer_label(int layer) const { return path + ": layer " + std::to_string(layer); }

  // Shapes, presence of optional datasets, and values: all before any write.
  void check_layer(int layer, const LayerData& data) const { traces::check_layer(meta, data, layer_label(layer)); }

  void write_root_attributes() const {
    const hid_t root = file.get();
    detail::write_string_attr(root, schema::kAttrSchema, kSchemaName);
    detail::write_int_attr(root, schema::kAttrVersion, kSchemaVersion);
    detail::write_string_attr(root, schema::kAttrProducer, meta.producer);
    detail::write_string_attr(root, schema::kAttrModel, meta.model);
    for (const schema::IntField& f : schema::int_fields()) detail::write_int_attr(root, f.attr, f.get(meta));
    detail::write_float_attr(root, schema::kAttrRopeTheta, meta.rope_theta);
    detail::write_string_attr(root, schema::kAttrRopeScaling, meta.rope_scaling);
    detail::write_string_attr(root, schema::kAttrRopeStyle, meta.rope_style);
    detail::write_string_attr(root, schema::kAttrDtype, dtype_name(meta.dtype));
  }
};

TraceWriter::TraceWriter(const std::string& path, const TraceMeta& meta, WriteOptions options)
    : impl_(std::make_unique<Impl>()) {
  detail::h5_quiet();
  schema::check_meta(meta, unlimited(), path);
  for (const std::string* s : {&meta.producer, &meta.model, &meta.rope_scaling})
    if (s->size() > detail::kMaxStringBytes)
      throw Error(ErrorKind::kUsage, path + ": metadata string longer than " + std::to_string(detail::kMaxStringBytes));
  if (options.deflate && (options.deflate_level < 0 || options.deflate_level > 9))
    throw Error(ErrorKind::kUsage, "deflate level " + std::to_string(options.deflate_level) + " is not in [0, 9]");
  if (options.chunk_bytes <= 0) throw Error(ErrorKind::kUsage, "chunk_bytes must be positive");
  Impl& w = *impl_;
  w.path = path;
  w.meta = meta;
  w.options = options;
  w.written.assign(static_cast<std::size_t>(meta.layers), false);
  w.file = h5_own(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose, ErrorKind::kIo,
                  "'" + path + "': cannot create");
  w.layers = detail::create_group(w.file.get(), schema::kLayersGroup, "/layers");
}

TraceWriter::~TraceWriter() = default;

void TraceWriter::write_layer(int layer, const LayerData& data) {
  detail::h5_quiet();
  Impl& w = *impl_;
  if (w.closed) throw Error(ErrorKind::kUsage, w.path + ": write_layer after close");
  if (layer < 0 || layer >= w.meta.layers)
    throw Error(ErrorKind::kUsage, w.path + ": layer " + std::to_string(layer) + " is out of range [0, " +
                                       std::to_string(w.meta.layers) + ")");
  if (w.written[static_cast<std::size_t>(layer)])
    throw Error(ErrorKind::kUsage, w.layer_label(layer) + " was already written");
  w.check_layer(layer, data);

  const std::string group_path = std::string("/") + schema::kLayersGroup + "/" + schema::layer_group(layer);
  H5Id group = detail::create_group(w.layers.get(), schema::layer_group(layer), group_path);
  H5Id prefill = detail::create_group(group.get(), schema::kPrefillGroup, group_path + "/" + schema::kPrefillGroup);
  H5Id decode = detail::create_group(group.get(), schema::kDecodeGroup, group_path + "/" + schema::kDecodeGroup);
  for (const schema::DatasetSpec& spec : schema::datasets()) {
    const Tensor* t = schema::find(data, spec);
    if (t == nullptr) continue;
    const hid_t parent = std::string_view(spec.stage) == schema::kPrefillGroup ? prefill.get() : decode.get();
    write_dataset(parent, spec.name, *t, schema::storage_dtype(spec, w.meta), w.options,
                  w.layer_label(layer) + ": " + schema::dataset_name(spec));
  }
  w.written[static_cast<std::size_t>(layer)] = true;
}

void TraceWriter::close() {
  detail::h5_quiet();
  Impl& w = *impl_;
  if (w.closed) return;
  w.closed = true;
  const auto missing = std::find(w.written.begin(), w.written.end(), false);
  if (missing != w.written.end()) {
    // Closed without root attributes: the reader rejects the partial file.
    (void)w.layers.close();
    (void)w.file.close();
    throw Error(ErrorKind::kTraceInvalid,
                w.layer_label(static_cast<int>(missing - w.written.begin())) + " was never written; trace incomplete");
  }
  w.write_root_attributes();
  (void)w.layers.close();
  h5_check(w.file.close(), ErrorKind::kIo, "'" + w.path + "': cannot close (flush) the file");
}

void write_trace(const std::string& path, const TraceMeta& meta, const std::vector<LayerData>& layers,
                 WriteOptions options) {
  if (static_cast<std::int64_t>(layers.size()) != meta.layers)
    throw Error(ErrorKind::kUsage, path + ": " + std::to_string(layers.size()) + " layers given, meta says " +
                                       std::to_string(meta.layers));
  TraceWriter writer(path, meta, options);
  for (std::size_t l = 0; l < layers.size(); ++l) writer.write_layer(static_cast<int>(l), layers[l]);
  writer.close();
}

}  // namespace kvscope::traces
