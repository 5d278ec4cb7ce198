// The schema validator on generated metadata. Byte mutation of whole files
// mostly exercises libhdf5's own parser; this target instead builds a
// well-formed HDF5 file (libhdf5's writer, in memory) whose *kvscope* content
// the fuzzer chooses: every root attribute correct, missing, of another type
// or value; every dataset correct, missing, of another shape, type, layout,
// chunking or filter, or a soft link; data bits arbitrary (NaN, Inf, huge).
// The reader must accept it or throw kvscope::Error, never crash.
#include <fuzzer/FuzzedDataProvider.h>
#include <hdf5.h>

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "kvscope/core/error.hpp"
#include "kvscope/traces/trace_io.hpp"

namespace {

// A construction step libhdf5 refused (e.g. chunk larger than the dataset): skip the input.
struct Refused {};

hid_t ok(hid_t id) {
  if (id < 0) throw Refused{};
  return id;
}

// Closes whatever ids a test case opened, in reverse order.
struct Ids {
  std::vector<std::pair<hid_t, herr_t (*)(hid_t)>> ids;
  hid_t add(hid_t id, herr_t (*close)(hid_t)) {
    ids.emplace_back(ok(id), close);
    return id;
  }
  ~Ids() {
    for (auto it = ids.rbegin(); it != ids.rend(); ++it) it->second(it->first);
  }
};

hid_t float16_type(Ids& ids, unsigned mant, unsigned ebias) {
  const hid_t t = ids.add(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
  ok(H5Tset_fields(t, 15, mant, 15 - mant, 0, mant));
  ok(H5Tset_size(t, 2));
  ok(H5Tset_ebias(t, ebias));
  return t;
}

// A file type for a dataset: usually the canonical one of its dtype.
hid_t pick_type(FuzzedDataProvider& in, Ids& ids, int dtype, bool colsum) {
  const int canonical = colsum ? 0 : dtype;  // 0 f32, 1 f16, 2 bf16
  switch (in.ConsumeIntegralInRange(0, 12)) {
    case 9: return H5T_IEEE_F64LE;
    case 10: return in.ConsumeBool() ? H5T_STD_I32LE : H5T_STD_U16LE;
    case 11: return H5T_IEEE_F32BE;
    case 12: return float16_type(ids, in.ConsumeIntegralInRange(1u, 13u), in.ConsumeIntegralInRange(0u, 255u));
    default: break;
  }
  if (canonical == 0) return H5T_IEEE_F32LE;
  return canonical == 1 ? float16_type(ids, 10, 15) : float16_type(ids, 7, 127);
}

void attr_int(hid_t obj, const char* name, hid_t type, std::int64_t v) {
  Ids ids;
  const hid_t space = ids.add(H5Screate(H5S_SCALAR), H5Sclose);
  const hid_t a = ids.add(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  ok(H5Awrite(a, H5T_NATIVE_INT64, &v));
}

void attr_float(hid_t obj, const char* name, double v) {
  Ids ids;
  const hid_t space = ids.add(H5Screate(H5S_SCALAR), H5Sclose);
  const hid_t a = ids.add(H5Acreate2(obj, name, H5T_IEEE_F64LE, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  ok(H5Awrite(a, H5T_NATIVE_DOUBLE, &v));
}

void attr_string(hid_t obj, const char* name, const std::string& v, bool variable) {
  Ids ids;
  const hid_t type = ids.add(H5Tcopy(H5T_C_S1), H5Tclose);
  ok(H5Tset_size(type, variable ? H5T_VARIABLE : v.size() + 1));
  const hid_t space = ids.add(H5Screate(H5S_SCALAR), H5Sclose);
  const hid_t a = ids.add(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  const char* p = v.c_str();
  ok(variable ? H5Awrite(a, type, &p) : H5Awrite(a, type, p));
}

// The correct value of a root attribute, or a fuzzed replacement.
void root_attr(FuzzedDataProvider& in, hid_t root, const char* name, const std::string& text, std::int64_t integer,
               double real, int kind /* 0 int, 1 float, 2 string */) {
  const int action = in.ConsumeIntegralInRange(0, 15);
  if (action == 11) return;  // missing
  if (action == 12) return attr_int(root, name, in.ConsumeBool() ? H5T_STD_I8LE : H5T_STD_I64BE,
                                    in.ConsumeIntegral<std::int64_t>() % 300);
  if (action == 13) return attr_int(root, name, H5T_STD_I64LE, in.ConsumeIntegral<std::int64_t>());
  if (action == 14) return attr_float(root, name, in.ConsumeFloatingPoint<double>());
  if (action == 15) return attr_string(root, name, in.ConsumeRandomLengthString(40), in.ConsumeBool());
  if (kind == 0) return attr_int(root, name, H5T_STD_I64LE, integer);
  if (kind == 1) return attr_float(root, name, real);
  attr_string(root, name, text, action == 10);
}

void dataset(FuzzedDataProvider& in, hid_t parent, const char* name, std::vector<hsize_t> dims, int dtype,
             bool colsum, bool want) {
  const int action = in.ConsumeIntegralInRange(0, 15);
  if (action == 15) want = !want;  // missing, or present without its flag
  if (!want) return;
  Ids ids;
  if (action == 14) {
    ok(H5Lcreate_soft("/layers", parent, name, H5P_DEFAULT, H5P_DEFAULT));
    return;
  }
  if (action == 13) {  // a group where a dataset belongs
    ids.add(H5Gcreate2(parent, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
    return;
  }
  if (action == 12) {
    if (in.ConsumeBool()) dims.push_back(1);
    else dims.pop_back();
  }
  if (action == 11 && !dims.empty()) dims[in.ConsumeIntegralInRange<std::size_t>(0, dims.size() - 1)] =
      in.ConsumeIntegralInRange<hsize_t>(0, 9);
  const hid_t type = pick_type(in, ids, dtype, colsum);
  hsize_t count = 1;
  for (hsize_t d : dims) count *= d;
  const hid_t space = ids.add(dims.empty() ? H5Screate(H5S_SCALAR)
                                           : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                              H5Sclose);
  const hid_t dcpl = ids.add(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  const int layout = in.ConsumeIntegralInRange(0, 6);
  if (layout == 5) ok(H5Pset_layout(dcpl, H5D_COMPACT));
  if (layout <= 3 && !dims.empty() && count > 0) {
    std::vector<hsize_t> chunk(dims.size());
    for (std::size_t i = 0; i < dims.size(); ++i) chunk[i] = in.ConsumeIntegralInRange<hsize_t>(1, dims[i]);
    ok(H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data()));
    if (in.ConsumeBool()) ok(H5Pset_fletcher32(dcpl));
    if (layout == 1) ok(H5Pset_shuffle(dcpl));
    if (layout == 1 || layout == 2) ok(H5Pset_deflate(dcpl, 1));
    if (layout == 3) ok(in.ConsumeBool() ? H5Pset_nbit(dcpl) : H5Pset_scaleoffset(dcpl, H5Z_SO_FLOAT_DSCALE, 2));
  }
  const hid_t d = ids.add(H5Dcreate2(parent, name, type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT), H5Dclose);
  if (count == 0 || in.ConsumeIntegralInRange(0, 9) == 0) return;  // sometimes never written
  // Arbitrary bits in the file's own type: NaN, Inf, subnormals, huge values.
  std::vector<unsigned char> bytes(count * H5Tget_size(type));
  const std::vector<unsigned char> fuzz = in.ConsumeBytes<unsigned char>(bytes.size());
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = fuzz.empty() ? 0x3c : fuzz[i % fuzz.size()];
  ok(H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.data()));
}

// Builds the file and returns its image.
std::vector<std::byte> build(FuzzedDataProvider& in) {
  const int layers = in.ConsumeIntegralInRange(1, 3), kv = in.ConsumeIntegralInRange(1, 3);
  const int q = kv * in.ConsumeIntegralInRange(1, 3), d = in.ConsumeIntegralInRange(1, 8);
  const int T = in.ConsumeIntegralInRange(1, 8), S = in.ConsumeIntegralInRange(0, 4);
  const int dtype = in.ConsumeIntegralInRange(0, 2);
  const bool has_o = in.ConsumeBool(), has_colsum = in.ConsumeBool();
  static const char* const kDtypes[] = {"float32", "float16", "bfloat16"};

  Ids ids;
  const hid_t fapl = ids.add(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  ok(H5Pset_fapl_core(fapl, 1 << 16, 0));  // memory only, no backing file
  const hid_t file = ids.add(H5Fcreate("fuzz_trace_schema.h5", H5F_ACC_TRUNC, H5P_DEFAULT, fapl), H5Fclose);
  const hid_t root = ids.add(H5Gopen2(file, "/", H5P_DEFAULT), H5Gclose);
  root_attr(in, root, "schema", "kvscope.trace", 0, 0, 2);
  root_attr(in, root, "schema_version", "", 1, 0, 0);
  root_attr(in, root, "producer", "fuzz", 0, 0, 2);
  root_attr(in, root, "model", "m", 0, 0, 2);
  root_attr(in, root, "layers", "", layers, 0, 0);
  root_attr(in, root, "q_heads", "", q, 0, 0);
  root_attr(in, root, "kv_heads", "", kv, 0, 0);
  root_attr(in, root, "head_dim", "", d, 0, 0);
  root_attr(in, root, "prompt_len", "", T, 0, 0);
  root_attr(in, root, "decode_steps", "", S, 0, 0);
  root_attr(in, root, "rope_theta", "", 0, 10000.0, 1);
  root_attr(in, root, "rope_scaling", "none", 0, 0, 2);
  root_attr(in, root, "rope_style", in.ConsumeBool() ? "neox" : "gptj", 0, 0, 2);
  root_attr(in, root, "dtype", kDtypes[dtype], 0, 0, 2);
  root_attr(in, root, "keys_post_rope", "", 1, 0, 0);
  root_attr(in, root, "has_decode_outputs", "", has_o, 0, 0);
  root_attr(in, root, "has_attn_colsum", "", has_colsum, 0, 0);

  const hid_t lg = ids.add(H5Gcreate2(file, "layers", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
  const auto Q = static_cast<hsize_t>(q), K = static_cast<hsize_t>(kv), D = static_cast<hsize_t>(d);
  const auto Tn = static_cast<hsize_t>(T), Sn = static_cast<hsize_t>(S);
  for (int l = 0; l < layers; ++l) {
    const std::string name = "layer_" + std::to_string(l);
    const hid_t g = ids.add(H5Gcreate2(lg, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
    const hid_t pre = ids.add(H5Gcreate2(g, "prefill", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
    const hid_t dec = ids.add(H5Gcreate2(g, "decode", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
    dataset(in, pre, "q", {Q, Tn, D}, dtype, false, true);
    dataset(in, pre, "k", {K, Tn, D}, dtype, false, true);
    dataset(in, pre, "v", {K, Tn, D}, dtype, false, true);
    dataset(in, pre, "attn_colsum", {Q, Tn}, dtype, true, has_colsum);
    dataset(in, dec, "q", {Q, Sn, D}, dtype, false, true);
    dataset(in, dec, "k", {K, Sn, D}, dtype, false, true);
    dataset(in, dec, "v", {K, Sn, D}, dtype, false, true);
    dataset(in, dec, "o", {Q, Sn, D}, dtype, false, has_o);
  }
  ok(H5Fflush(file, H5F_SCOPE_GLOBAL));
  const ssize_t size = H5Fget_file_image(file, nullptr, 0);
  if (size <= 0) throw Refused{};
  std::vector<std::byte> image(static_cast<std::size_t>(size));
  if (H5Fget_file_image(file, image.data(), image.size()) != size) throw Refused{};
  return image;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  FuzzedDataProvider in(data, size);
  std::vector<std::byte> image;
  try {
    image = build(in);
  } catch (const Refused&) {
    return 0;
  }
  try {
    const auto reader = kvscope::traces::TraceReader::from_memory(image);
    for (int l = 0; l < reader.meta().layers; ++l) (void)reader.read_layer(l);
  } catch (const kvscope::Error&) {
    // Rejected with a typed error: the point. Anything else escapes as a finding.
  }
  return 0;
}
