// Trace schema v1 (docs/trace-format.md) in one place, shared by the writer
// and the reader: attribute, group and dataset names, the storage type of each
// dtype, the expected shape of every dataset, the metadata rules and the
// NaN/Inf policy.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "h5_util.hpp"
#include "kvscope/core/trace_data.hpp"
#include "kvscope/traces/trace_io.hpp"

namespace kvscope::traces::schema {

// Root attributes (kSchemaName / kSchemaVersion values live in trace_io.hpp).
inline constexpr const char* kAttrSchema = "schema";
inline constexpr const char* kAttrVersion = "schema_version";
inline constexpr const char* kAttrProducer = "producer";
inline constexpr const char* kAttrModel = "model";
inline constexpr const char* kAttrRopeTheta = "rope_theta";
inline constexpr const char* kAttrRopeScaling = "rope_scaling";
inline constexpr const char* kAttrRopeStyle = "rope_style";
inline constexpr const char* kAttrDtype = "dtype";
inline constexpr const char* kAttrLayers = "layers";
inline constexpr const char* kAttrQHeads = "q_heads";
inline constexpr const char* kAttrKvHeads = "kv_heads";
inline constexpr const char* kAttrHeadDim = "head_dim";
inline constexpr const char* kAttrPromptLen = "prompt_len";
inline constexpr const char* kAttrDecodeSteps = "decode_steps";
inline constexpr const char* kAttrKeysPostRope = "keys_post_rope";
inline constexpr const char* kAttrHasDecodeOutputs = "has_decode_outputs";
inline constexpr const char* kAttrHasAttnColsum = "has_attn_colsum";

// The RoPE conventions a trace may declare: rotate-half pairs (i, i + d/2) as
// HF Llama/GPT-NeoX, or interleaved pairs (2i, 2i + 1) as GPT-J.
inline constexpr std::array<const char*, 2> kRopeStyles = {"neox", "gptj"};

/// An integer root attribute: its range and where it lives in TraceMeta.
/// Flags (keys_post_rope, has_*) are integers 0 or 1.
struct IntField {
  const char* attr;
  std::int64_t lo;
  std::int64_t (*hi)(const ReadLimits&);
  const char* limit;  // what bounds it, for messages ("ReadLimits::max_layers")
  std::int64_t (*get)(const TraceMeta&);
  void (*set)(TraceMeta&, std::int64_t);
};
std::span<const IntField> int_fields();
/// Throws kTraceInvalid unless lo <= value <= hi (checked before narrowing).
void check_int_field(const IntField& field, std::int64_t value, const ReadLimits& limits, const std::string& where);

// Layout: /layers/layer_<l>/{prefill,decode}/<dataset>.
inline constexpr const char* kLayersGroup = "layers";
inline constexpr const char* kPrefillGroup = "prefill";
inline constexpr const char* kDecodeGroup = "decode";
std::string layer_group(int layer);  // "layer_<l>"

enum class Axis { kQHeads, kKvHeads, kPrompt, kDecode, kHeadDim };
enum class Presence { kRequired, kIfDecodeOutputs, kIfAttnColsum };

struct DatasetSpec {
  const char* stage;  // group inside the layer: kPrefillGroup or kDecodeGroup
  const char* name;   // "q", "k", "v", "o", "attn_colsum"
  std::array<Axis, 3> axes;
  int rank;
  Presence presence;
  bool colsum;        // accumulated attention: always float32, values >= 0
  // Where it lives in LayerData: exactly one of the two is set.
  Tensor LayerData::*required;
  std::optional<Tensor> LayerData::*optional;
};

/// Every dataset of a layer, in the order the reader checks them.
std::span<const DatasetSpec> datasets();
std::string dataset_name(const DatasetSpec& spec);  // "prefill/k"
bool is_present(const DatasetSpec& spec, const TraceMeta& meta);
/// The root flag that declares an optional dataset ("has_decode_outputs"); nullptr if required.
const char* presence_flag(const DatasetSpec& spec);
DType storage_dtype(const DatasetSpec& spec, const TraceMeta& meta);
std::vector<std::int64_t> shape(const DatasetSpec& spec, const TraceMeta& meta);
/// The shape as validation axes: "has 3 heads, expected kv_heads = 2".
std::vector<detail::Axis> expected_axes(const DatasetSpec& spec, const TraceMeta& meta);

/// The tensor of `spec` in a layer (nullptr for an absent optional one).
const Tensor* find(const LayerData& layer, const DatasetSpec& spec);
/// The tensor of `spec`, emplacing optional ones.
Tensor& slot(LayerData& layer, const DatasetSpec& spec);

/// The canonical HDF5 file type of a dtype: IEEE float32 LE, or a 16-bit float
/// derived from it (HDF5 1.10 has no predefined fp16/bf16).
detail::H5Id storage_type(DType dtype);

/// Checks metadata against the schema rules and `limits`; `where` names the
/// file. Throws kTraceInvalid naming the attribute.
void check_meta(const TraceMeta& meta, const ReadLimits& limits, const std::string& where);

/// "head 1, token 5, dim 3" for flat index `index` of a [heads, tokens(, dim)] tensor.
std::string location(const Tensor& tensor, std::int64_t index);
/// NaN/Inf anywhere, or a negative attn_colsum value: kBadNumber naming the
/// dataset (`label`) and the element.
void check_values(const Tensor& tensor, const DatasetSpec& spec, const std::string& label);

}  // namespace kvscope::traces::schema
