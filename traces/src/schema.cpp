#include "schema.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <sstream>

namespace kvscope::traces::schema {

// Raw 16-bit words are handed to HDF5 as little-endian floats.
static_assert(std::endian::native == std::endian::little, "trace I/O assumes a little-endian host");

namespace {

std::int64_t one(const ReadLimits&) { return 1; }

constexpr IntField kIntFields[] = {
    {kAttrLayers, 1, [](const ReadLimits& l) -> std::int64_t { return l.max_layers; }, "ReadLimits::max_layers",
     [](const TraceMeta& m) -> std::int64_t { return m.layers; },
     [](TraceMeta& m, std::int64_t v) { m.layers = static_cast<int>(v); }},
    {kAttrQHeads, 1, [](const ReadLimits& l) -> std::int64_t { return l.max_heads; }, "ReadLimits::max_heads",
     [](const TraceMeta& m) -> std::int64_t { return m.q_heads; },
     [](TraceMeta& m, std::int64_t v) { m.q_heads = static_cast<int>(v); }},
    {kAttrKvHeads, 1, [](const ReadLimits& l) -> std::int64_t { return l.max_heads; }, "ReadLimits::max_heads",
     [](const TraceMeta& m) -> std::int64_t { return m.kv_heads; },
     [](TraceMeta& m, std::int64_t v) { m.kv_heads = static_cast<int>(v); }},
    {kAttrHeadDim, 1, [](const ReadLimits& l) -> std::int64_t { return l.max_head_dim; }, "ReadLimits::max_head_dim",
     [](const TraceMeta& m) -> std::int64_t { return m.head_dim; },
     [](TraceMeta& m, std::int64_t v) { m.head_dim = static_cast<int>(v); }},
    {kAttrPromptLen, 1, [](const ReadLimits& l) { return l.max_prompt; }, "ReadLimits::max_prompt",
     [](const TraceMeta& m) { return m.prompt_len; }, [](TraceMeta& m, std::int64_t v) { m.prompt_len = v; }},
    {kAttrDecodeSteps, 0, [](const ReadLimits& l) { return l.max_decode; }, "ReadLimits::max_decode",
     [](const TraceMeta& m) { return m.decode_steps; }, [](TraceMeta& m, std::int64_t v) { m.decode_steps = v; }},
    {kAttrKeysPostRope, 0, one, "a flag",
     [](const TraceMeta& m) -> std::int64_t { return m.keys_post_rope; },
     [](TraceMeta& m, std::int64_t v) { m.keys_post_rope = v != 0; }},
    {kAttrHasDecodeOutputs, 0, one, "a flag",
     [](const TraceMeta& m) -> std::int64_t { return m.has_decode_outputs; },
     [](TraceMeta& m, std::int64_t v) { m.has_decode_outputs = v != 0; }},
    {kAttrHasAttnColsum, 0, one, "a flag",
     [](const TraceMeta& m) -> std::int64_t { return m.has_attn_colsum; },
     [](TraceMeta& m, std::int64_t v) { m.has_attn_colsum = v != 0; }},
};

using A = Axis;
using L = LayerData;
constexpr DatasetSpec kDatasets[] = {
    {kPrefillGroup, "q", {A::kQHeads, A::kPrompt, A::kHeadDim}, 3, Presence::kRequired, false, &L::prefill_q, nullptr},
    {kPrefillGroup, "k", {A::kKvHeads, A::kPrompt, A::kHeadDim}, 3, Presence::kRequired, false, &L::prefill_k, nullptr},
    {kPrefillGroup, "v", {A::kKvHeads, A::kPrompt, A::kHeadDim}, 3, Presence::kRequired, false, &L::prefill_v, nullptr},
    {kPrefillGroup, "attn_colsum", {A::kQHeads, A::kPrompt, A::kHeadDim}, 2, Presence::kIfAttnColsum, true, nullptr,
     &L::attn_colsum},
    {kDecodeGroup, "q", {A::kQHeads, A::kDecode, A::kHeadDim}, 3, Presence::kRequired, false, &L::decode_q, nullptr},
    {kDecodeGroup, "k", {A::kKvHeads, A::kDecode, A::kHeadDim}, 3, Presence::kRequired, false, &L::decode_k, nullptr},
    {kDecodeGroup, "v", {A::kKvHeads, A::kDecode, A::kHeadDim}, 3, Presence::kRequired, false, &L::decode_v, nullptr},
    {kDecodeGroup, "o", {A::kQHeads, A::kDecode, A::kHeadDim}, 3, Presence::kIfDecodeOutputs, false, nullptr, &L::decode_o},
};

std::int64_t axis_size(Axis a, const TraceMeta& m) {
  switch (a) {
    case Axis::kQHeads: return m.q_heads;
    case Axis::kKvHeads: return m.kv_heads;
    case Axis::kPrompt: return m.prompt_len;
    case Axis::kDecode: return m.decode_steps;
    case Axis::kHeadDim: return m.head_dim;
  }
  return 0;
}

const char* axis_attr(Axis a) {
  switch (a) {
    case Axis::kQHeads: return kAttrQHeads;
    case Axis::kKvHeads: return kAttrKvHeads;
    case Axis::kPrompt: return kAttrPromptLen;
    case Axis::kDecode: return kAttrDecodeSteps;
    case Axis::kHeadDim: return kAttrHeadDim;
  }
  return "?";
}

const char* axis_noun(Axis a) {
  switch (a) {
    case Axis::kQHeads:
    case Axis::kKvHeads: return "heads";
    case Axis::kPrompt:
    case Axis::kDecode: return "tokens";
    case Axis::kHeadDim: return "values per token";
  }
  return "elements";
}

[[noreturn]] void bad_meta(const std::string& where, const std::string& what) {
  throw Error(ErrorKind::kTraceInvalid, where + ": " + what);
}

}  // namespace

std::span<const IntField> int_fields() { return kIntFields; }

std::string layer_group(int layer) { return "layer_" + std::to_string(layer); }

std::span<const DatasetSpec> datasets() { return kDatasets; }

std::string dataset_name(const DatasetSpec& spec) { return std::string(spec.stage) + "/" + spec.name; }

bool is_present(const DatasetSpec& spec, const TraceMeta& meta) {
  switch (spec.presence) {
    case Presence::kRequired: return true;
    case Presence::kIfDecodeOutputs: return meta.has_decode_outputs;
    case Presence::kIfAttnColsum: return meta.has_attn_colsum;
  }
  return false;
}

const char* presence_flag(const DatasetSpec& spec) {
  switch (spec.presence) {
    case Presence::kRequired: return nullptr;
    case Presence::kIfDecodeOutputs: return kAttrHasDecodeOutputs;
    case Presence::kIfAttnColsum: return kAttrHasAttnColsum;
  }
  return nullptr;
}

DType storage_dtype(const DatasetSpec& spec, const TraceMeta& meta) {
  return spec.colsum ? DType::kF32 : meta.dtype;  // sums over T queries need fp32 range and precision
}

std::vector<std::int64_t> shape(const DatasetSpec& spec, const TraceMeta& meta) {
  std::vector<std::int64_t> s;
  for (int i = 0; i < spec.rank; ++i) s.push_back(axis_size(spec.axes[static_cast<std::size_t>(i)], meta));
  return s;
}

std::vector<detail::Axis> expected_axes(const DatasetSpec& spec, const TraceMeta& meta) {
  std::vector<detail::Axis> axes;
  for (int i = 0; i < spec.rank; ++i) {
    const Axis a = spec.axes[static_cast<std::size_t>(i)];
    const std::int64_t n = axis_size(a, meta);
    axes.push_back({n, n, axis_noun(a), std::string(axis_attr(a)) + " = " + std::to_string(n)});
  }
  return axes;
}

const Tensor* find(const LayerData& layer, const DatasetSpec& spec) {
  if (spec.required != nullptr) return &(layer.*spec.required);
  const std::optional<Tensor>& t = layer.*spec.optional;
  return t ? &*t : nullptr;
}

Tensor& slot(LayerData& layer, const DatasetSpec& spec) {
  if (spec.required != nullptr) return layer.*spec.required;
  return (layer.*spec.optional).emplace();
}

detail::H5Id storage_type(DType dtype) {
  using detail::h5_check;
  detail::H5Id type = detail::h5_own(H5Tcopy(H5T_IEEE_F32LE), H5Tclose, ErrorKind::kInternal, "float type");
  const hid_t t = type.get();
  const std::string what = std::string("build the ") + dtype_name(dtype) + " type";
  switch (dtype) {
    case DType::kF32: break;
    case DType::kF16:  // IEEE binary16: sign 15, exponent 10..14, mantissa 0..9
      h5_check(H5Tset_fields(t, 15, 10, 5, 0, 10), ErrorKind::kInternal, what);
      h5_check(H5Tset_size(t, 2), ErrorKind::kInternal, what);
      h5_check(H5Tset_ebias(t, 15), ErrorKind::kInternal, what);
      break;
    case DType::kBF16:  // the top half of a float32: sign 15, exponent 7..14, mantissa 0..6
      h5_check(H5Tset_fields(t, 15, 7, 8, 0, 7), ErrorKind::kInternal, what);
      h5_check(H5Tset_size(t, 2), ErrorKind::kInternal, what);
      h5_check(H5Tset_ebias(t, 127), ErrorKind::kInternal, what);
      break;
  }
  return type;
}

void check_int_field(const IntField& f, std::int64_t value, const ReadLimits& limits, const std::string& where) {
  const std::int64_t hi = f.hi(limits);
  if (value < f.lo || value > hi)
    bad_meta(where, std::string("root attribute '") + f.attr + "' = " + std::to_string(value) + " is out of range [" +
                        std::to_string(f.lo) + ", " + std::to_string(hi) + "] (" + f.limit + ")");
}

void check_meta(const TraceMeta& meta, const ReadLimits& limits, const std::string& where) {
  for (const IntField& f : kIntFields) check_int_field(f, f.get(meta), limits, where);
  if (meta.q_heads % meta.kv_heads != 0)
    bad_meta(where, "root attribute 'q_heads' = " + std::to_string(meta.q_heads) + " is not a multiple of kv_heads = " +
                        std::to_string(meta.kv_heads));
  if (!std::isfinite(meta.rope_theta) || meta.rope_theta <= 0)
    bad_meta(where, "root attribute 'rope_theta' must be a positive finite number");
  if (std::find_if(kRopeStyles.begin(), kRopeStyles.end(), [&](const char* s) { return meta.rope_style == s; }) ==
      kRopeStyles.end())
    bad_meta(where, "root attribute 'rope_style' = '" + meta.rope_style + "' is not one of neox, gptj");
  // Everything one layer decodes to, as fp32 in memory: bounded before any allocation.
  std::int64_t bytes = 0;
  for (const DatasetSpec& spec : kDatasets) {
    if (!is_present(spec, meta)) continue;
    std::int64_t n = 4;
    for (std::int64_t d : shape(spec, meta)) n = detail::checked_mul(n, d, where + ": layer size");
    if (__builtin_add_overflow(bytes, n, &bytes)) bad_meta(where, "layer size overflows 64 bits");
  }
  if (bytes > limits.max_layer_bytes)
    bad_meta(where, "one layer holds " + std::to_string(bytes) + " bytes of data, more than ReadLimits::max_layer_bytes = " +
                        std::to_string(limits.max_layer_bytes));
}

std::string location(const Tensor& tensor, std::int64_t index) {
  const std::int64_t dims = tensor.rank() == 3 ? tensor.dim(2) : 1;
  const std::int64_t tokens = tensor.dim(1);
  std::string s = "head " + std::to_string(index / (tokens * dims)) + ", token " + std::to_string(index / dims % tokens);
  if (tensor.rank() == 3) s += ", dim " + std::to_string(index % dims);
  return s;
}

void check_values(const Tensor& tensor, const DatasetSpec& spec, const std::string& label) {
  const std::size_t n = tensor.data.size();
  for (std::size_t i = 0; i < n; ++i) {
    const float x = tensor.data[i];
    if (std::isfinite(x) && !(spec.colsum && x < 0.0f)) continue;
    const std::string at = location(tensor, static_cast<std::int64_t>(i));
    std::ostringstream what;
    if (std::isnan(x)) what << label << " has NaN at " << at;
    else if (std::isinf(x)) what << label << " has " << (x > 0 ? "+Inf" : "-Inf") << " at " << at;
    else what << label << " has negative value " << x << " at " << at << " (accumulated attention must be >= 0)";
    throw Error(ErrorKind::kBadNumber, what.str());
  }
}

}  // namespace kvscope::traces::schema
