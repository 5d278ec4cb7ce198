// Validating trace reader (schema v1). Opening checks the root attributes and
// then every dataset of every layer (link, shape, type, layout, filters,
// storage) without reading data; read_layer re-opens one layer's datasets
// through the same checks, reads them as raw elements of the canonical type
// (no HDF5 conversion runs on file data), decodes 16-bit words with our own
// code and applies the NaN/Inf policy.
#include <cstdint>
#include <string_view>
#include <vector>

#include "h5_util.hpp"
#include "kvscope/traces/trace_io.hpp"
#include "schema.hpp"

namespace kvscope::traces {
namespace {

using detail::H5Id;
using detail::ObjectKind;

TraceMeta read_meta(hid_t root, const ReadLimits& limits, const std::string& label) {
  const std::string owner = label + ": root";
  const std::optional<std::string> name = detail::read_string_attr(root, schema::kAttrSchema, owner);
  if (!name)
    detail::throw_invalid(label + ": root attribute 'schema' is missing: not a kvscope trace (or an interrupted write)");
  if (*name != kSchemaName)
    detail::throw_invalid(owner + " attribute 'schema' = '" + *name + "', expected '" + kSchemaName + "'");
  const std::int64_t version = detail::require_int_attr(root, schema::kAttrVersion, owner);
  if (version != kSchemaVersion)
    detail::throw_invalid(owner + " attribute 'schema_version' = " + std::to_string(version) +
                          " is not supported (this reader reads version " + std::to_string(kSchemaVersion) + ")");

  TraceMeta meta;
  for (const schema::IntField& f : schema::int_fields()) {
    const std::int64_t v = detail::require_int_attr(root, f.attr, owner);
    schema::check_int_field(f, v, limits, label);  // before narrowing into an int
    f.set(meta, v);
  }
  meta.producer = detail::require_string_attr(root, schema::kAttrProducer, owner);
  meta.model = detail::require_string_attr(root, schema::kAttrModel, owner);
  meta.rope_theta = detail::require_float_attr(root, schema::kAttrRopeTheta, owner);
  meta.rope_scaling = detail::require_string_attr(root, schema::kAttrRopeScaling, owner);
  meta.rope_style = detail::require_string_attr(root, schema::kAttrRopeStyle, owner);
  const std::string dtype = detail::require_string_attr(root, schema::kAttrDtype, owner);
  const std::optional<DType> parsed = parse_dtype(dtype);
  if (!parsed)
    detail::throw_invalid(owner + " attribute 'dtype' = '" + dtype + "' is not float32, float16 or bfloat16");
  meta.dtype = *parsed;
  schema::check_meta(meta, limits, label);
  return meta;
}

void decode16(const std::vector<std::uint16_t>& bits, DType dtype, Tensor& out) {
  for (std::size_t i = 0; i < bits.size(); ++i)
    out.data[i] = dtype == DType::kF16 ? f16_bits_to_float(bits[i]) : bf16_bits_to_float(bits[i]);
}

}  // namespace

struct TraceReader::Impl {
  std::string label;  // the path, or "<memory>"
  ReadLimits limits;
  TraceMeta meta;
  H5Id file;
  H5Id layers;
  H5Id f32_type;   // canonical type of float32 data (attn_colsum)
  H5Id data_type;  // canonical type of meta.dtype

  void open(H5Id opened) {
    file = std::move(opened);
    meta = read_meta(file.get(), limits, label);
    f32_type = schema::storage_type(DType::kF32);
    data_type = schema::storage_type(meta.dtype);
    layers = detail::require_child(file.get(), schema::kLayersGroup, ObjectKind::kGroup,
                                   label + ": group /" + schema::kLayersGroup);
    for (int l = 0; l < meta.layers; ++l) (void)open_layer(l);
  }

  std::string layer_label(int layer) const { return label + ": layer " + std::to_string(layer); }

  struct Opened {
    const schema::DatasetSpec* spec;
    H5Id dataset;
  };

  // Every dataset of a layer, validated (and absent optional ones confirmed absent).
  std::vector<Opened> open_layer(int layer) const {
    const std::string group_path = std::string("/") + schema::kLayersGroup + "/" + schema::layer_group(layer);
    H5Id group = detail::require_child(layers.get(), schema::layer_group(layer), ObjectKind::kGroup,
                                       layer_label(layer) + ": group " + group_path);
    H5Id prefill = detail::require_child(group.get(), schema::kPrefillGroup, ObjectKind::kGroup,
                                         layer_label(layer) + ": group " + group_path + "/" + schema::kPrefillGroup);
    H5Id decode = detail::require_child(group.get(), schema::kDecodeGroup, ObjectKind::kGroup,
                                        layer_label(layer) + ": group " + group_path + "/" + schema::kDecodeGroup);
    std::vector<Opened> out;
    for (const schema::DatasetSpec& spec : schema::datasets()) {
      const std::string ds_label = layer_label(layer) + ": " + schema::dataset_name(spec);
      const hid_t parent = std::string_view(spec.stage) == schema::kPrefillGroup ? prefill.get() : decode.get();
      std::optional<H5Id> dset = detail::open_child(parent, spec.name, ObjectKind::kDataset, ds_label);
      const bool want = schema::is_present(spec, meta);
      const char* flag = schema::presence_flag(spec);
      if (want && !dset) {
        if (flag == nullptr) detail::throw_invalid(ds_label + " is missing");
        detail::throw_invalid(ds_label + " is missing but root attribute '" + flag + "' = 1");
      }
      if (!want && dset) detail::throw_invalid(ds_label + " is present but root attribute '" + flag + "' = 0");
      if (!dset) continue;
      const DType dtype = schema::storage_dtype(spec, meta);
      detail::DatasetExpect expect{ds_label, dtype == DType::kF32 ? f32_type.get() : data_type.get(),
                                   dtype_name(dtype), schema::expected_axes(spec, meta)};
      (void)detail::check_dataset(dset->get(), expect);
      out.push_back({&spec, std::move(*dset)});
    }
    return out;
  }

  Tensor read(const Opened& o, int layer) const {
    const std::string ds_label = layer_label(layer) + ": " + schema::dataset_name(*o.spec);
    const DType dtype = schema::storage_dtype(*o.spec, meta);
    Tensor t(schema::shape(*o.spec, meta));  // sized from validated metadata
    if (t.size() == 0) return t;
    if (dtype == DType::kF32) {
      detail::read_raw(o.dataset.get(), f32_type.get(), t.data.data(), ds_label);
    } else {
      std::vector<std::uint16_t> bits(t.data.size());
      detail::read_raw(o.dataset.get(), data_type.get(), bits.data(), ds_label);
      decode16(bits, dtype, t);
    }
    schema::check_values(t, *o.spec, ds_label);
    return t;
  }
};

TraceReader::TraceReader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

TraceReader::TraceReader(const std::string& path, ReadLimits limits) : impl_(std::make_unique<Impl>()) {
  impl_->label = path;
  impl_->limits = limits;
  impl_->open(detail::open_file_readonly(path));
}

TraceReader TraceReader::from_memory(std::span<const std::byte> image, ReadLimits limits) {
  auto impl = std::make_unique<Impl>();
  impl->label = "<memory>";
  impl->limits = limits;
  impl->open(detail::open_file_image(image, impl->label));
  return TraceReader(std::move(impl));
}

TraceReader::~TraceReader() = default;
TraceReader::TraceReader(TraceReader&&) noexcept = default;
TraceReader& TraceReader::operator=(TraceReader&&) noexcept = default;

const TraceMeta& TraceReader::meta() const { return impl_->meta; }

LayerData TraceReader::read_layer(int layer) const {
  detail::h5_quiet();
  const Impl& r = *impl_;
  if (layer < 0 || layer >= r.meta.layers)
    throw Error(ErrorKind::kUsage, r.label + ": layer " + std::to_string(layer) + " is out of range [0, " +
                                       std::to_string(r.meta.layers) + ")");
  LayerData out;
  for (const Impl::Opened& o : r.open_layer(layer)) schema::slot(out, *o.spec) = r.read(o, layer);
  return out;
}

}  // namespace kvscope::traces
