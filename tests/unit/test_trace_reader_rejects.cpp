// The validating reader against a malformed corpus generated here: each case
// writes a valid trace with the writer, breaks one thing with the raw HDF5 C
// API (or the bytes), and asserts the error kind and a message naming the
// problem. Cases that leave an HDF5 file are also read from memory.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kvscope/core/error.hpp"
#include "kvscope/traces/trace_io.hpp"

namespace kvscope::traces {
namespace {

namespace fs = std::filesystem;

// Owns one raw HDF5 id in the test's own mutations.
struct Id {
  hid_t id;
  herr_t (*close)(hid_t);
  Id(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {
    if (id < 0) throw std::runtime_error("HDF5 call failed while building a malformed file");
  }
  ~Id() { close(id); }
  Id(const Id&) = delete;
  Id& operator=(const Id&) = delete;
  operator hid_t() const { return id; }
};

void ok(herr_t status) {
  if (status < 0) throw std::runtime_error("HDF5 call failed while building a malformed file");
}

// The valid base trace: 2 layers, 4 q heads, 2 kv heads, d = 8, T = 6, S = 3,
// float16 with decode/o and attn_colsum.
TraceMeta base_meta() {
  TraceMeta m;
  m.model = "malformed-corpus";
  m.layers = 2;
  m.q_heads = 4;
  m.kv_heads = 2;
  m.head_dim = 8;
  m.prompt_len = 6;
  m.decode_steps = 3;
  m.dtype = DType::kF16;
  m.has_decode_outputs = true;
  m.has_attn_colsum = true;
  return m;
}

LayerData base_layer(const TraceMeta& m, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  auto make = [&](std::vector<std::int64_t> shape, bool positive = false) {
    Tensor t(std::move(shape));
    for (float& x : t.data) x = positive ? std::abs(dist(rng)) : dist(rng);
    return t;
  };
  const std::int64_t q = m.q_heads, kv = m.kv_heads, d = m.head_dim, T = m.prompt_len, S = m.decode_steps;
  LayerData l;
  l.prefill_q = make({q, T, d});
  l.prefill_k = make({kv, T, d});
  l.prefill_v = make({kv, T, d});
  l.decode_q = make({q, S, d});
  l.decode_k = make({kv, S, d});
  l.decode_v = make({kv, S, d});
  if (m.has_decode_outputs) l.decode_o = make({q, S, d});
  if (m.has_attn_colsum) l.attn_colsum = make({q, T}, true);
  return l;
}

// A fp16 type with the given fields, built like the writer's types.
Id float16_type(std::size_t epos, std::size_t esize, std::size_t msize, std::size_t ebias) {
  Id t(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
  ok(H5Tset_fields(t, 15, epos, esize, 0, msize));
  ok(H5Tset_size(t, 2));
  ok(H5Tset_ebias(t, ebias));
  return Id(H5Tcopy(t), H5Tclose);
}

class TraceRejects : public ::testing::Test {
 protected:
  void SetUp() override {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("kvscope_rej_" + std::to_string(getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    path_ = (dir_ / "trace.h5").string();
  }
  void TearDown() override { fs::remove_all(dir_); }

  void write_valid(TraceMeta meta = base_meta(), WriteOptions options = {}) {
    std::vector<LayerData> layers;
    for (int l = 0; l < meta.layers; ++l) layers.push_back(base_layer(meta, 17u + static_cast<std::uint32_t>(l)));
    write_trace(path_, meta, layers, options);
  }

  // Opens the written file read-write for one mutation.
  void mutate(const std::function<void(hid_t)>& f) {
    Id file(H5Fopen(path_.c_str(), H5F_ACC_RDWR, H5P_DEFAULT), H5Fclose);
    f(file);
  }

  static void set_int_attr(hid_t obj, const char* name, std::int64_t v) {
    if (H5Aexists(obj, name) > 0) ok(H5Adelete(obj, name));
    Id space(H5Screate(H5S_SCALAR), H5Sclose);
    Id a(H5Acreate2(obj, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    ok(H5Awrite(a, H5T_NATIVE_INT64, &v));
  }
  static void set_double_attr(hid_t obj, const char* name, double v) {
    if (H5Aexists(obj, name) > 0) ok(H5Adelete(obj, name));
    Id space(H5Screate(H5S_SCALAR), H5Sclose);
    Id a(H5Acreate2(obj, name, H5T_IEEE_F64LE, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    ok(H5Awrite(a, H5T_NATIVE_DOUBLE, &v));
  }
  static void set_string_attr(hid_t obj, const char* name, const std::string& v) {
    if (H5Aexists(obj, name) > 0) ok(H5Adelete(obj, name));
    Id type(H5Tcopy(H5T_C_S1), H5Tclose);
    ok(H5Tset_size(type, v.size() + 1));
    Id space(H5Screate(H5S_SCALAR), H5Sclose);
    Id a(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    ok(H5Awrite(a, type, v.c_str()));
  }

  // Replaces the dataset at `path` with one of `type` and `dims`, filled with
  // zero bytes unless `fill` is false.
  static void replace(hid_t file, const char* path, hid_t type, std::vector<hsize_t> dims, hid_t dcpl = H5P_DEFAULT,
                      bool fill = true) {
    ok(H5Ldelete(file, path, H5P_DEFAULT));
    Id space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
    Id d(H5Dcreate2(file, path, type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT), H5Dclose);
    if (!fill) return;
    hsize_t n = 1;
    for (hsize_t x : dims) n *= x;
    std::vector<unsigned char> zeros(n * H5Tget_size(type), 0);
    ok(H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, zeros.data()));
  }

  // Overwrites element `index` of a dataset with the raw element `bytes`
  // (2 bytes for float16 data, 4 for float32), through its own type.
  static void poke(hid_t file, const char* path, std::size_t index, const void* bytes) {
    Id d(H5Dopen2(file, path, H5P_DEFAULT), H5Dclose);
    Id type(H5Dget_type(d), H5Tclose);
    Id space(H5Dget_space(d), H5Sclose);
    const std::size_t size = H5Tget_size(type);
    std::vector<unsigned char> data(static_cast<std::size_t>(H5Sget_simple_extent_npoints(space)) * size);
    ok(H5Dread(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()));
    std::memcpy(data.data() + index * size, bytes, size);
    ok(H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()));
  }

  std::vector<std::byte> file_bytes() const {
    std::ifstream in(path_, std::ios::binary);
    std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> out(chars.size());
    std::memcpy(out.data(), chars.data(), chars.size());
    return out;
  }

  void write_bytes(const std::vector<char>& bytes) const {
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }

  // Opening and reading every layer must fail with `kind` and a message
  // containing `substring`, from the file and (when it exists) from memory.
  // `memory_substring` replaces `substring` for the in-memory read when given.
  void expect_rejected(ErrorKind kind, const std::string& substring, ReadLimits limits = {},
                       const std::string& memory_substring = "") {
    check_one([&] { return TraceReader(path_, limits); }, kind, substring, "file");
    if (!fs::exists(path_) || fs::file_size(path_) == 0) return;
    const std::vector<std::byte> image = file_bytes();
    check_one([&] { return TraceReader::from_memory(image, limits); }, kind,
              memory_substring.empty() ? substring : memory_substring, "memory");
  }

 private:
  template <class Open>
  static void check_one(Open open, ErrorKind kind, const std::string& substring, const char* source) {
    try {
      const TraceReader reader = open();
      for (int l = 0; l < reader.meta().layers; ++l) (void)reader.read_layer(l);
      FAIL() << source << ": accepted; expected an error mentioning '" << substring << "'";
    } catch (const Error& e) {
      EXPECT_EQ(static_cast<int>(kind), static_cast<int>(e.kind())) << source << ": " << e.what();
      EXPECT_NE(std::string(e.what()).find(substring), std::string::npos) << source << ": " << e.what();
    }
  }

 protected:
  fs::path dir_;
  std::string path_;
};

// The base file itself must pass, or every rejection below is vacuous.
TEST_F(TraceRejects, BaseFileIsAccepted) {
  write_valid();
  const TraceReader reader(path_);
  EXPECT_EQ(reader.meta().layers, 2);
  EXPECT_NO_THROW((void)reader.read_layer(1));
  EXPECT_NO_THROW((void)TraceReader::from_memory(file_bytes()).read_layer(0));
}

// --- Not an HDF5 trace at all -------------------------------------------------

TEST_F(TraceRejects, NonexistentFile) { expect_rejected(ErrorKind::kIo, "no such file"); }

TEST_F(TraceRejects, EmptyFile) {
  write_bytes({});
  expect_rejected(ErrorKind::kIo, "empty file");
}

TEST_F(TraceRejects, TextFile) {
  const std::string text = "layers,q_heads\n2,4\nthis is a CSV file, not HDF5\n";
  write_bytes(std::vector<char>(text.begin(), text.end()));
  expect_rejected(ErrorKind::kIo, "not an HDF5 file");
}

TEST_F(TraceRejects, RandomBytes) {
  std::mt19937 rng(4242);
  std::vector<char> bytes(8192);
  for (char& c : bytes) c = static_cast<char>(rng() & 0xff);
  write_bytes(bytes);
  expect_rejected(ErrorKind::kIo, "not an HDF5 file");
}

TEST_F(TraceRejects, TruncatedFile) {
  write_valid();
  const std::vector<std::byte> image = file_bytes();
  std::vector<char> half(image.size() / 2);
  std::memcpy(half.data(), image.data(), half.size());
  write_bytes(half);
  expect_rejected(ErrorKind::kIo, "truncated HDF5 file", {}, "corrupt or truncated image");
}

TEST_F(TraceRejects, CorruptedChunkFailsItsChecksum) {
  write_valid();
  haddr_t addr = 0;
  mutate([&](hid_t f) {
    Id d(H5Dopen2(f, "/layers/layer_1/prefill/k", H5P_DEFAULT), H5Dclose);
    hsize_t offset[3] = {};
    unsigned mask = 0;
    hsize_t size = 0;
    Id space(H5Dget_space(d), H5Sclose);
    ok(H5Dget_chunk_info(d, space, 0, offset, &mask, &addr, &size));
  });
  std::vector<std::byte> image = file_bytes();
  image[addr + 5] ^= std::byte{0x40};
  std::vector<char> bytes(image.size());
  std::memcpy(bytes.data(), image.data(), image.size());
  write_bytes(bytes);
  expect_rejected(ErrorKind::kIo, "layer 1: prefill/k: cannot read data");
}

// --- Root attributes ----------------------------------------------------------

TEST_F(TraceRejects, WrongSchemaName) {
  write_valid();
  mutate([](hid_t f) { set_string_attr(f, "schema", "other.trace"); });
  expect_rejected(ErrorKind::kTraceInvalid, "attribute 'schema' = 'other.trace', expected 'kvscope.trace'");
}

TEST_F(TraceRejects, WrongSchemaVersion) {
  write_valid();
  mutate([](hid_t f) { set_int_attr(f, "schema_version", 2); });
  expect_rejected(ErrorKind::kTraceInvalid, "'schema_version' = 2 is not supported");
}

TEST_F(TraceRejects, MissingSchemaAttribute) {
  write_valid();
  mutate([](hid_t f) { ok(H5Adelete(f, "schema")); });
  expect_rejected(ErrorKind::kTraceInvalid, "'schema' is missing: not a kvscope trace");
}

TEST_F(TraceRejects, MissingRootAttribute) {
  write_valid();
  mutate([](hid_t f) { ok(H5Adelete(f, "head_dim")); });
  expect_rejected(ErrorKind::kTraceInvalid, "root attribute 'head_dim' is missing");
}

TEST_F(TraceRejects, IntegerAttributeStoredAsString) {
  write_valid();
  mutate([](hid_t f) { set_string_attr(f, "layers", "2"); });
  expect_rejected(ErrorKind::kTraceInvalid, "attribute 'layers' has string type, expected an integer");
}

TEST_F(TraceRejects, IntegerAttributeStoredAsFloat) {
  write_valid();
  mutate([](hid_t f) { set_double_attr(f, "kv_heads", 2.0); });
  expect_rejected(ErrorKind::kTraceInvalid, "attribute 'kv_heads' has float type, expected an integer");
}

TEST_F(TraceRejects, StringAttributeStoredAsInteger) {
  write_valid();
  mutate([](hid_t f) { set_int_attr(f, "dtype", 16); });
  expect_rejected(ErrorKind::kTraceInvalid, "attribute 'dtype' has integer type, expected a string");
}

TEST_F(TraceRejects, AttributeHoldingAnArray) {
  write_valid();
  mutate([](hid_t f) {
    ok(H5Adelete(f, "q_heads"));
    const hsize_t two = 2;
    Id space(H5Screate_simple(1, &two, nullptr), H5Sclose);
    Id a(H5Acreate2(f, "q_heads", H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    const std::int64_t v[2] = {4, 4};
    ok(H5Awrite(a, H5T_NATIVE_INT64, v));
  });
  expect_rejected(ErrorKind::kTraceInvalid, "attribute 'q_heads' must hold a single value");
}

TEST_F(TraceRejects, OverlongStringAttribute) {
  write_valid();
  mutate([](hid_t f) { set_string_attr(f, "model", std::string(10000, 'x')); });
  expect_rejected(ErrorKind::kTraceInvalid, "attribute 'model' is a 10001-byte string, longer than the limit 4096");
}

TEST_F(TraceRejects, AbsurdLayerCount) {
  write_valid();
  mutate([](hid_t f) { set_int_attr(f, "layers", 1000000000); });
  expect_rejected(ErrorKind::kTraceInvalid, "'layers' = 1000000000 is out of range [1, 512] (ReadLimits::max_layers)");
}

TEST_F(TraceRejects, AbsurdHeadDim) {
  write_valid();
  mutate([](hid_t f) { set_int_attr(f, "head_dim", 10000000); });
  expect_rejected(ErrorKind::kTraceInvalid, "'head_dim' = 10000000 is out of range");
}

TEST_F(TraceRejects, PromptLengthBeyondInt64Limits) {
  write_valid();
  mutate([](hid_t f) { set_int_attr(f, "prompt_len", std::numeric_limits<std::int64_t>::max()); });
  expect_rejected(ErrorKind::kTraceInvalid, "'prompt_len' = 9223372036854775807 is out of range");
}

TEST_F(TraceRejects, NegativeDecodeSteps) {
  write_valid();
  mutate([](hid_t f) { set_int_attr(f, "decode_steps", -1); });
  expect_rejected(ErrorKind::kTraceInvalid, "'decode_steps' = -1 is out of range");
}

TEST_F(TraceRejects, LayerLargerThanTheByteLimit) {
  write_valid();
  ReadLimits limits;
  limits.max_layer_bytes = 1024;
  expect_rejected(ErrorKind::kTraceInvalid, "more than ReadLimits::max_layer_bytes = 1024", limits);
}

TEST_F(TraceRejects, QHeadsNotAMultipleOfKvHeads) {
  write_valid();
  mutate([](hid_t f) { set_int_attr(f, "q_heads", 3); });
  expect_rejected(ErrorKind::kTraceInvalid, "'q_heads' = 3 is not a multiple of kv_heads = 2");
}

TEST_F(TraceRejects, FlagOutOfRange) {
  write_valid();
  mutate([](hid_t f) { set_int_attr(f, "keys_post_rope", 7); });
  expect_rejected(ErrorKind::kTraceInvalid, "'keys_post_rope' = 7 is out of range [0, 1]");
}

TEST_F(TraceRejects, UnknownDtype) {
  write_valid();
  mutate([](hid_t f) { set_string_attr(f, "dtype", "float8_e4m3"); });
  expect_rejected(ErrorKind::kTraceInvalid, "'dtype' = 'float8_e4m3' is not float32, float16 or bfloat16");
}

TEST_F(TraceRejects, NonFiniteRopeTheta) {
  write_valid();
  mutate([](hid_t f) { set_double_attr(f, "rope_theta", std::numeric_limits<double>::infinity()); });
  expect_rejected(ErrorKind::kTraceInvalid, "'rope_theta' must be a positive finite number");
}

TEST_F(TraceRejects, UnknownRopeStyle) {
  write_valid();
  mutate([](hid_t f) { set_string_attr(f, "rope_style", "alibi"); });
  expect_rejected(ErrorKind::kTraceInvalid, "'rope_style' = 'alibi' is not one of neox, gptj");
}

// What h5py writes by default must still be accepted: variable-length
// strings, 32-bit integers, an integer rope_theta.
TEST_F(TraceRejects, H5pyStyleAttributesAreAccepted) {
  write_valid();
  mutate([](hid_t f) {
    ok(H5Adelete(f, "model"));
    Id vl(H5Tcopy(H5T_C_S1), H5Tclose);
    ok(H5Tset_size(vl, H5T_VARIABLE));
    ok(H5Tset_cset(vl, H5T_CSET_UTF8));
    Id space(H5Screate(H5S_SCALAR), H5Sclose);
    Id a(H5Acreate2(f, "model", vl, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    const char* name = "meta-llama/Llama-3.1-8B";
    ok(H5Awrite(a, vl, &name));
    ok(H5Adelete(f, "q_heads"));
    Id b(H5Acreate2(f, "q_heads", H5T_STD_I32LE, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    const std::int32_t four = 4;
    ok(H5Awrite(b, H5T_NATIVE_INT32, &four));
    set_int_attr(f, "rope_theta", 500000);
  });
  const TraceReader reader(path_);
  EXPECT_EQ(reader.meta().model, "meta-llama/Llama-3.1-8B");
  EXPECT_EQ(reader.meta().q_heads, 4);
  EXPECT_EQ(reader.meta().rope_theta, 500000.0);
  EXPECT_NO_THROW((void)reader.read_layer(1));
}

// --- Groups, links and datasets -----------------------------------------------

TEST_F(TraceRejects, MissingLayerGroup) {
  write_valid();
  mutate([](hid_t f) { ok(H5Ldelete(f, "/layers/layer_1", H5P_DEFAULT)); });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 1: group /layers/layer_1 is missing");
}

TEST_F(TraceRejects, MissingDataset) {
  write_valid();
  mutate([](hid_t f) { ok(H5Ldelete(f, "/layers/layer_0/prefill/v", H5P_DEFAULT)); });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: prefill/v is missing");
}

TEST_F(TraceRejects, DeclaredOptionalDatasetMissing) {
  write_valid();
  mutate([](hid_t f) { ok(H5Ldelete(f, "/layers/layer_1/decode/o", H5P_DEFAULT)); });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 1: decode/o is missing but root attribute 'has_decode_outputs' = 1");
}

TEST_F(TraceRejects, UndeclaredOptionalDatasetPresent) {
  write_valid();
  mutate([](hid_t f) { set_int_attr(f, "has_attn_colsum", 0); });
  expect_rejected(ErrorKind::kTraceInvalid, "prefill/attn_colsum is present but root attribute 'has_attn_colsum' = 0");
}

TEST_F(TraceRejects, GroupWhereADatasetBelongs) {
  write_valid();
  mutate([](hid_t f) {
    ok(H5Ldelete(f, "/layers/layer_0/decode/k", H5P_DEFAULT));
    Id g(H5Gcreate2(f, "/layers/layer_0/decode/k", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: decode/k is a group, expected a dataset");
}

TEST_F(TraceRejects, SoftLinkInsteadOfDataset) {
  write_valid();
  mutate([](hid_t f) {
    ok(H5Ldelete(f, "/layers/layer_1/prefill/k", H5P_DEFAULT));
    ok(H5Lcreate_soft("/layers/layer_0/prefill/k", f, "/layers/layer_1/prefill/k", H5P_DEFAULT, H5P_DEFAULT));
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 1: prefill/k is a soft link; only hard links are allowed");
}

TEST_F(TraceRejects, ExternalLinkInsteadOfDataset) {
  write_valid();
  mutate([](hid_t f) {
    ok(H5Ldelete(f, "/layers/layer_0/prefill/q", H5P_DEFAULT));
    ok(H5Lcreate_external("/etc/other.h5", "/data", f, "/layers/layer_0/prefill/q", H5P_DEFAULT, H5P_DEFAULT));
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: prefill/q is an external link");
}

TEST_F(TraceRejects, SoftLinkInsteadOfLayersGroup) {
  write_valid();
  mutate([](hid_t f) {
    ok(H5Lmove(f, "/layers", f, "/real_layers", H5P_DEFAULT, H5P_DEFAULT));
    ok(H5Lcreate_soft("/real_layers", f, "/layers", H5P_DEFAULT, H5P_DEFAULT));
  });
  expect_rejected(ErrorKind::kTraceInvalid, "group /layers is a soft link");
}

// --- Dataset shape ------------------------------------------------------------

TEST_F(TraceRejects, MismatchedHeads) {
  write_valid();
  mutate([](hid_t f) {
    Id t = float16_type(10, 5, 10, 15);
    replace(f, "/layers/layer_0/prefill/k", t, {3, 6, 8});
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: prefill/k has 3 heads, expected kv_heads = 2");
}

TEST_F(TraceRejects, PrefillKeysAndQueriesDisagreeOnT) {
  write_valid();
  mutate([](hid_t f) {
    Id t = float16_type(10, 5, 10, 15);
    replace(f, "/layers/layer_1/prefill/k", t, {2, 7, 8});
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 1: prefill/k has 7 tokens, expected prompt_len = 6");
}

TEST_F(TraceRejects, DecodeStepsMismatch) {
  write_valid();
  mutate([](hid_t f) {
    Id t = float16_type(10, 5, 10, 15);
    replace(f, "/layers/layer_0/decode/v", t, {2, 2, 8});
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: decode/v has 2 tokens, expected decode_steps = 3");
}

TEST_F(TraceRejects, WrongHeadDimInDataset) {
  write_valid();
  mutate([](hid_t f) {
    Id t = float16_type(10, 5, 10, 15);
    replace(f, "/layers/layer_0/decode/q", t, {4, 3, 16});
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: decode/q has 16 values per token, expected head_dim = 8");
}

TEST_F(TraceRejects, WrongRank) {
  write_valid();
  mutate([](hid_t f) {
    Id t = float16_type(10, 5, 10, 15);
    replace(f, "/layers/layer_0/prefill/q", t, {4, 48});
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: prefill/q has rank 2, expected rank 3");
}

TEST_F(TraceRejects, ScalarDataspace) {
  write_valid();
  mutate([](hid_t f) {
    ok(H5Ldelete(f, "/layers/layer_0/prefill/attn_colsum", H5P_DEFAULT));
    Id space(H5Screate(H5S_SCALAR), H5Sclose);
    Id d(H5Dcreate2(f, "/layers/layer_0/prefill/attn_colsum", H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT,
                    H5P_DEFAULT),
         H5Dclose);
  });
  expect_rejected(ErrorKind::kTraceInvalid, "prefill/attn_colsum has a scalar dataspace");
}

TEST_F(TraceRejects, AbsurdDatasetDimsAreNeverAllocated) {
  write_valid();
  mutate([](hid_t f) {
    Id dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    const hsize_t chunk[3] = {1, 64, 8};
    ok(H5Pset_chunk(dcpl, 3, chunk));
    Id t = float16_type(10, 5, 10, 15);
    replace(f, "/layers/layer_0/prefill/v", t, {2, 1000000000000ull, 8}, dcpl, false);
  });
  expect_rejected(ErrorKind::kTraceInvalid, "prefill/v has 1000000000000 tokens, expected prompt_len = 6");
}

// --- Dataset type -------------------------------------------------------------

TEST_F(TraceRejects, Int32Dataset) {
  write_valid();
  mutate([](hid_t f) { replace(f, "/layers/layer_0/prefill/k", H5T_STD_I32LE, {2, 6, 8}); });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: prefill/k has integer data, expected float16");
}

TEST_F(TraceRejects, Float64Dataset) {
  write_valid();
  mutate([](hid_t f) { replace(f, "/layers/layer_1/decode/k", H5T_IEEE_F64LE, {2, 3, 8}); });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 1: decode/k has 64-bit floats, expected float16 (16-bit)");
}

TEST_F(TraceRejects, CustomFloatWithBFloat16FieldsInAFloat16Trace) {
  write_valid();
  mutate([](hid_t f) {
    Id bf16 = float16_type(7, 8, 7, 127);
    replace(f, "/layers/layer_0/prefill/v", bf16, {2, 6, 8});
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: prefill/v has a 16-bit float with fields");
}

TEST_F(TraceRejects, CustomFloatWithWrongExponentBias) {
  write_valid();
  mutate([](hid_t f) {
    Id odd = float16_type(10, 5, 10, 14);
    replace(f, "/layers/layer_0/decode/q", odd, {4, 3, 8});
  });
  expect_rejected(ErrorKind::kTraceInvalid, "bias 14), expected float16");
}

TEST_F(TraceRejects, BigEndianFloat32) {
  TraceMeta meta = base_meta();
  meta.dtype = DType::kF32;
  write_valid(meta);
  mutate([](hid_t f) { replace(f, "/layers/layer_1/prefill/q", H5T_IEEE_F32BE, {4, 6, 8}); });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 1: prefill/q has big-endian floats, expected little-endian float32");
}

TEST_F(TraceRejects, ColsumNotFloat32) {
  write_valid();
  mutate([](hid_t f) {
    Id t = float16_type(10, 5, 10, 15);
    replace(f, "/layers/layer_0/prefill/attn_colsum", t, {4, 6});
  });
  expect_rejected(ErrorKind::kTraceInvalid, "prefill/attn_colsum has 16-bit floats, expected float32");
}

// --- Layout, filters, storage -------------------------------------------------

TEST_F(TraceRejects, CompactLayout) {
  write_valid();
  mutate([](hid_t f) {
    Id dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    ok(H5Pset_layout(dcpl, H5D_COMPACT));
    Id t = float16_type(10, 5, 10, 15);
    replace(f, "/layers/layer_0/prefill/k", t, {2, 6, 8}, dcpl);
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: prefill/k has compact layout");
}

TEST_F(TraceRejects, VirtualLayout) {
  write_valid();
  mutate([](hid_t f) {
    Id t = float16_type(10, 5, 10, 15);
    const hsize_t dims[3] = {2, 6, 8};
    Id space(H5Screate_simple(3, dims, nullptr), H5Sclose);
    Id dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    ok(H5Pset_virtual(dcpl, space, ".", "/layers/layer_1/prefill/k", space));
    ok(H5Ldelete(f, "/layers/layer_0/prefill/k", H5P_DEFAULT));
    Id d(H5Dcreate2(f, "/layers/layer_0/prefill/k", t, space, H5P_DEFAULT, dcpl, H5P_DEFAULT), H5Dclose);
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: prefill/k has virtual layout");
}

TEST_F(TraceRejects, ExternalStorage) {
  write_valid();
  mutate([&](hid_t f) {
    Id dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    ok(H5Pset_external(dcpl, (dir_ / "raw.bin").c_str(), 0, 2 * 6 * 8 * 2));
    Id t = float16_type(10, 5, 10, 15);
    replace(f, "/layers/layer_1/prefill/v", t, {2, 6, 8}, dcpl);
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 1: prefill/v uses external storage");
}

TEST_F(TraceRejects, UnsupportedFilter) {
  TraceMeta meta = base_meta();
  meta.dtype = DType::kF32;
  write_valid(meta);
  mutate([](hid_t f) {
    Id dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    const hsize_t chunk[3] = {1, 3, 8};
    ok(H5Pset_chunk(dcpl, 3, chunk));
    ok(H5Pset_scaleoffset(dcpl, H5Z_SO_FLOAT_DSCALE, 2));  // lossy: never in a ground-truth trace
    replace(f, "/layers/layer_0/decode/o", H5T_IEEE_F32LE, {4, 3, 8}, dcpl);
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: decode/o uses unsupported filter 6");
}

TEST_F(TraceRejects, OversizedChunks) {
  write_valid();
  mutate([](hid_t f) {
    set_int_attr(f, "head_dim", 1024);
    set_int_attr(f, "prompt_len", 2048);
    Id dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    const hsize_t chunk[3] = {1, 2048, 1024};  // 8 MiB of float32
    ok(H5Pset_chunk(dcpl, 3, chunk));
    Id t(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
    set_string_attr(f, "dtype", "float32");
    replace(f, "/layers/layer_0/prefill/q", t, {4, 2048, 1024}, dcpl, false);
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: prefill/q has 8388608-byte chunks, more than the limit 4194304");
}

TEST_F(TraceRejects, DatasetNeverWritten) {
  write_valid();
  mutate([](hid_t f) {
    Id t = float16_type(10, 5, 10, 15);
    replace(f, "/layers/layer_1/decode/q", t, {4, 3, 8}, H5P_DEFAULT, false);
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 1: decode/q has no stored data");
}

TEST_F(TraceRejects, ChunkedDatasetOnlyPartlyWritten) {
  write_valid();
  mutate([](hid_t f) {
    Id dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    const hsize_t chunk[3] = {1, 2, 8};
    ok(H5Pset_chunk(dcpl, 3, chunk));
    Id t = float16_type(10, 5, 10, 15);
    replace(f, "/layers/layer_0/prefill/k", t, {2, 6, 8}, dcpl, false);
    Id d(H5Dopen2(f, "/layers/layer_0/prefill/k", H5P_DEFAULT), H5Dclose);
    Id space(H5Dget_space(d), H5Sclose);
    const hsize_t start[3] = {0, 0, 0}, count[3] = {1, 2, 8};
    ok(H5Sselect_hyperslab(space, H5S_SELECT_SET, start, nullptr, count, nullptr));
    Id mem(H5Screate_simple(3, count, nullptr), H5Sclose);
    const std::vector<std::uint16_t> zeros(16, 0);
    ok(H5Dwrite(d, t, mem, space, H5P_DEFAULT, zeros.data()));
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: prefill/k is only partly written");
}

// HDF5 1.10 trusts a chunk's filter mask: a 16-byte chunk claiming to skip
// deflate and fletcher32 would overrun HDF5's buffer when read.
TEST_F(TraceRejects, ChunkSkippingRequiredFilters) {
  WriteOptions options;
  options.deflate = true;
  write_valid(base_meta(), options);
  mutate([](hid_t f) {
    Id d(H5Dopen2(f, "/layers/layer_1/prefill/attn_colsum", H5P_DEFAULT), H5Dclose);
    const hsize_t offset[2] = {2, 0};
    const unsigned char bytes[16] = {};
    ok(H5Dwrite_chunk(d, H5P_DEFAULT, 0x1f, offset, sizeof bytes, bytes));
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 1: prefill/attn_colsum chunk (2, 0) skips required filters");
}

TEST_F(TraceRejects, ImplausiblyCompressedChunk) {
  WriteOptions options;
  options.deflate = true;
  write_valid(base_meta(), options);
  mutate([](hid_t f) {
    Id d(H5Dopen2(f, "/layers/layer_0/prefill/q", H5P_DEFAULT), H5Dclose);
    const hsize_t offset[3] = {1, 0, 0};
    const unsigned char bytes[4] = {};
    ok(H5Dwrite_chunk(d, H5P_DEFAULT, 0, offset, sizeof bytes, bytes));
  });
  expect_rejected(ErrorKind::kTraceInvalid, "layer 0: prefill/q chunk (1, 0, 0) stores 4 bytes for a 96-byte chunk");
}

// --- Values (read_layer) ------------------------------------------------------

TEST_F(TraceRejects, NaNInPrefillKeys) {
  write_valid();
  const std::uint16_t nan16 = 0x7e00;
  // head 1, token 2, dim 3 of [2, 6, 8]
  mutate([&](hid_t f) { poke(f, "/layers/layer_1/prefill/k", (1 * 6 + 2) * 8 + 3, &nan16); });
  expect_rejected(ErrorKind::kBadNumber, "layer 1: prefill/k has NaN at head 1, token 2, dim 3");
}

TEST_F(TraceRejects, InfInDecodeQueries) {
  write_valid();
  const std::uint16_t inf16 = 0x7c00;
  mutate([&](hid_t f) { poke(f, "/layers/layer_0/decode/q", (3 * 3 + 1) * 8 + 7, &inf16); });
  expect_rejected(ErrorKind::kBadNumber, "layer 0: decode/q has +Inf at head 3, token 1, dim 7");
}

TEST_F(TraceRejects, NegativeInfInBFloat16Outputs) {
  TraceMeta meta = base_meta();
  meta.dtype = DType::kBF16;
  write_valid(meta);
  const std::uint16_t minus_inf = 0xff80;
  mutate([&](hid_t f) { poke(f, "/layers/layer_1/decode/o", 0, &minus_inf); });
  expect_rejected(ErrorKind::kBadNumber, "layer 1: decode/o has -Inf at head 0, token 0, dim 0");
}

TEST_F(TraceRejects, NaNInColsum) {
  write_valid();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  mutate([&](hid_t f) { poke(f, "/layers/layer_0/prefill/attn_colsum", 2 * 6 + 5, &nan); });
  expect_rejected(ErrorKind::kBadNumber, "layer 0: prefill/attn_colsum has NaN at head 2, token 5");
}

TEST_F(TraceRejects, NegativeColsum) {
  write_valid();
  const float negative = -0.5f;
  mutate([&](hid_t f) { poke(f, "/layers/layer_1/prefill/attn_colsum", 3 * 6 + 1, &negative); });
  expect_rejected(ErrorKind::kBadNumber, "layer 1: prefill/attn_colsum has negative value -0.5 at head 3, token 1");
}

// --- API misuse ---------------------------------------------------------------

TEST_F(TraceRejects, ReadLayerOutOfRange) {
  write_valid();
  const TraceReader reader(path_);
  for (int layer : {-1, 2, 1 << 30}) {
    try {
      (void)reader.read_layer(layer);
      ADD_FAILURE() << "read_layer(" << layer << ") accepted";
    } catch (const Error& e) {
      EXPECT_EQ(static_cast<int>(ErrorKind::kUsage), static_cast<int>(e.kind())) << e.what();
      EXPECT_NE(std::string(e.what()).find("is out of range [0, 2)"), std::string::npos) << e.what();
    }
  }
}

TEST_F(TraceRejects, EmptyMemoryImage) {
  try {
    (void)TraceReader::from_memory({});
    FAIL() << "accepted an empty image";
  } catch (const Error& e) {
    EXPECT_EQ(static_cast<int>(ErrorKind::kIo), static_cast<int>(e.kind()));
    EXPECT_NE(std::string(e.what()).find("empty file image"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kvscope::traces
