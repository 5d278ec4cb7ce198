// Trace writer -> reader round trips (schema v1) in every storage dtype, with
// and without optional datasets, deflate on and off, S = 0; exact 16-bit
// encodings; writer-side rejections; plan dump round trip.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kvscope/core/error.hpp"
#include "kvscope/traces/plan_dump.hpp"
#include "kvscope/traces/trace_io.hpp"

namespace kvscope::traces {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
class TraceFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string(info->test_suite_name()) + "_" + info->name();
    for (char& c : name)
      if (c == '/') c = '_';
    dir_ = fs::temp_directory_path() / ("kvscope_rt_" + std::to_string(getpid()) + "_" + name);
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

TraceMeta small_meta(DType dtype, std::int64_t decode_steps, bool optional) {
  TraceMeta m;
  m.producer = "test_trace_roundtrip";
  m.model = "tiny-test-model";
  m.layers = 3;
  m.q_heads = 4;
  m.kv_heads = 2;
  m.head_dim = 16;
  m.prompt_len = 37;
  m.decode_steps = decode_steps;
  m.rope_theta = 500000.0;
  m.rope_scaling = "llama3:8.0";
  m.rope_style = "gptj";
  m.keys_post_rope = false;
  m.dtype = dtype;
  m.has_decode_outputs = optional;
  m.has_attn_colsum = optional;
  return m;
}

Tensor random_tensor(std::vector<std::int64_t> shape, std::mt19937& rng, float lo, float hi) {
  Tensor t(std::move(shape));
  std::uniform_real_distribution<float> dist(lo, hi);
  for (float& x : t.data) x = dist(rng);
  return t;
}

// Unrounded values: most are not representable in fp16/bf16.
LayerData random_layer(const TraceMeta& m, std::uint32_t seed) {
  std::mt19937 rng(seed);
  const std::int64_t q = m.q_heads, kv = m.kv_heads, d = m.head_dim, T = m.prompt_len, S = m.decode_steps;
  LayerData l;
  l.prefill_q = random_tensor({q, T, d}, rng, -4.0f, 4.0f);
  l.prefill_k = random_tensor({kv, T, d}, rng, -30.0f, 30.0f);
  l.prefill_v = random_tensor({kv, T, d}, rng, -1.0f, 1.0f);
  l.decode_q = random_tensor({q, S, d}, rng, -4.0f, 4.0f);
  l.decode_k = random_tensor({kv, S, d}, rng, -30.0f, 30.0f);
  l.decode_v = random_tensor({kv, S, d}, rng, -1.0f, 1.0f);
  if (m.has_decode_outputs) l.decode_o = random_tensor({q, S, d}, rng, -1.0f, 1.0f);
  if (m.has_attn_colsum) l.attn_colsum = random_tensor({q, T}, rng, 0.0f, 5.0f);
  return l;
}

// Bitwise equality (so -0 != +0), with the first difference in the message.
void expect_bits_equal(const Tensor& expected, const Tensor& actual, const std::string& what) {
  ASSERT_EQ(expected.shape, actual.shape) << what;
  ASSERT_EQ(expected.data.size(), actual.data.size()) << what;
  for (std::size_t i = 0; i < expected.data.size(); ++i)
    ASSERT_EQ(std::bit_cast<std::uint32_t>(expected.data[i]), std::bit_cast<std::uint32_t>(actual.data[i]))
        << what << " index " << i << ": expected " << expected.data[i] << ", got " << actual.data[i];
}

Tensor rounded(const Tensor& t, DType dtype) {
  Tensor out = t;
  for (float& x : out.data) x = round_to_dtype(x, dtype);
  return out;
}

void expect_meta_equal(const TraceMeta& a, const TraceMeta& b) {
  EXPECT_EQ(a.producer, b.producer);
  EXPECT_EQ(a.model, b.model);
  EXPECT_EQ(a.layers, b.layers);
  EXPECT_EQ(a.q_heads, b.q_heads);
  EXPECT_EQ(a.kv_heads, b.kv_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.prompt_len, b.prompt_len);
  EXPECT_EQ(a.decode_steps, b.decode_steps);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.rope_scaling, b.rope_scaling);
  EXPECT_EQ(a.rope_style, b.rope_style);
  EXPECT_EQ(a.keys_post_rope, b.keys_post_rope);
  EXPECT_EQ(a.dtype, b.dtype);
  EXPECT_EQ(a.has_decode_outputs, b.has_decode_outputs);
  EXPECT_EQ(a.has_attn_colsum, b.has_attn_colsum);
}

// ---------------------------------------------------------------------------
// Parameterized round trip: dtype x optional datasets x deflate x S.

struct RoundTripCase {
  DType dtype;
  bool optional;
  bool deflate;
  std::int64_t decode_steps;
};

std::string describe(const RoundTripCase& c) {
  return std::string(dtype_name(c.dtype)) + (c.optional ? "_WithOptional" : "_NoOptional") +
         (c.deflate ? "_Deflate" : "_Raw") + "_S" + std::to_string(c.decode_steps);
}
std::string case_name(const ::testing::TestParamInfo<RoundTripCase>& info) { return describe(info.param); }
void PrintTo(const RoundTripCase& c, std::ostream* os) { *os << describe(c); }

class TraceRoundTrip : public TraceFiles, public ::testing::WithParamInterface<RoundTripCase> {};

TEST_P(TraceRoundTrip, ValuesComeBackRoundedToTheDtype) {
  const RoundTripCase& c = GetParam();
  const TraceMeta meta = small_meta(c.dtype, c.decode_steps, c.optional);
  std::vector<LayerData> layers;
  for (int l = 0; l < meta.layers; ++l) layers.push_back(random_layer(meta, 1000u + static_cast<std::uint32_t>(l)));
  WriteOptions options;
  options.deflate = c.deflate;
  options.chunk_bytes = 256;  // several chunks per head, with a partial last one
  const std::string path = file("trace.h5");
  write_trace(path, meta, layers, options);

  const TraceReader reader(path);
  expect_meta_equal(meta, reader.meta());
  for (int l = 0; l < meta.layers; ++l) {
    const LayerData got = reader.read_layer(l);
    const LayerData& want = layers[static_cast<std::size_t>(l)];
    const std::string at = "layer " + std::to_string(l) + " ";
    expect_bits_equal(rounded(want.prefill_q, c.dtype), got.prefill_q, at + "prefill/q");
    expect_bits_equal(rounded(want.prefill_k, c.dtype), got.prefill_k, at + "prefill/k");
    expect_bits_equal(rounded(want.prefill_v, c.dtype), got.prefill_v, at + "prefill/v");
    expect_bits_equal(rounded(want.decode_q, c.dtype), got.decode_q, at + "decode/q");
    expect_bits_equal(rounded(want.decode_k, c.dtype), got.decode_k, at + "decode/k");
    expect_bits_equal(rounded(want.decode_v, c.dtype), got.decode_v, at + "decode/v");
    ASSERT_EQ(c.optional, got.decode_o.has_value());
    ASSERT_EQ(c.optional, got.attn_colsum.has_value());
    if (c.optional) {
      expect_bits_equal(rounded(*want.decode_o, c.dtype), *got.decode_o, at + "decode/o");
      // attn_colsum is float32 whatever the dtype: it comes back unrounded.
      expect_bits_equal(*want.attn_colsum, *got.attn_colsum, at + "prefill/attn_colsum");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllDtypes, TraceRoundTrip,
    ::testing::Values(RoundTripCase{DType::kF32, true, false, 5}, RoundTripCase{DType::kF32, false, true, 5},
                      RoundTripCase{DType::kF32, true, true, 0}, RoundTripCase{DType::kF16, true, false, 5},
                      RoundTripCase{DType::kF16, false, false, 0}, RoundTripCase{DType::kF16, true, true, 5},
                      RoundTripCase{DType::kBF16, true, false, 5}, RoundTripCase{DType::kBF16, false, true, 5},
                      RoundTripCase{DType::kBF16, true, true, 0}),
    case_name);

// ---------------------------------------------------------------------------
// Exact encodings.

class TraceEncoding : public TraceFiles {
 protected:
  // Writes `values` as prefill/q of a one-layer trace and reads them back.
  std::vector<float> round_trip(DType dtype, const std::vector<float>& values) {
    TraceMeta m = small_meta(dtype, 0, false);
    m.layers = 1;
    m.q_heads = m.kv_heads = 1;
    m.head_dim = 1;
    m.prompt_len = static_cast<std::int64_t>(values.size());
    LayerData l;
    l.prefill_q = Tensor({1, m.prompt_len, 1});
    l.prefill_q.data = values;
    l.prefill_k = l.prefill_v = Tensor({1, m.prompt_len, 1});
    l.decode_q = l.decode_k = l.decode_v = Tensor({1, 0, 1});
    const std::string path = file("enc.h5");
    write_trace(path, m, {l});
    return TraceReader(path).read_layer(0).prefill_q.data;
  }

  // Every finite bit pattern of a 16-bit dtype comes back bit-exact.
  void all_patterns(DType dtype, float (*decode)(std::uint16_t)) {
    std::vector<float> values;
    for (std::uint32_t b = 0; b < 65536; ++b) {
      const float x = decode(static_cast<std::uint16_t>(b));
      if (std::isfinite(x)) values.push_back(x);
    }
    const std::vector<float> got = round_trip(dtype, values);
    ASSERT_EQ(values.size(), got.size());
    for (std::size_t i = 0; i < values.size(); ++i)
      ASSERT_EQ(std::bit_cast<std::uint32_t>(values[i]), std::bit_cast<std::uint32_t>(got[i])) << "pattern " << i;
  }
};

TEST_F(TraceEncoding, EveryFiniteFloat16PatternIsBitExact) { all_patterns(DType::kF16, f16_bits_to_float); }

TEST_F(TraceEncoding, EveryFiniteBFloat16PatternIsBitExact) { all_patterns(DType::kBF16, bf16_bits_to_float); }

TEST_F(TraceEncoding, Float16RoundsToNearestEven) {
  const float ulp = std::ldexp(1.0f, -10);  // fp16 spacing in [1, 2)
  const std::vector<float> got = round_trip(DType::kF16, {1.0f + 0.5f * ulp, 1.0f + 1.5f * ulp, 1.0f + 0.75f * ulp,
                                                           -(1.0f + 0.25f * ulp), 65504.0f, std::ldexp(1.0f, -24), -0.0f});
  const std::vector<float> want = {1.0f, 1.0f + 2 * ulp, 1.0f + ulp, -1.0f, 65504.0f, std::ldexp(1.0f, -24), -0.0f};
  ASSERT_EQ(want.size(), got.size());
  for (std::size_t i = 0; i < want.size(); ++i)
    EXPECT_EQ(std::bit_cast<std::uint32_t>(want[i]), std::bit_cast<std::uint32_t>(got[i])) << "value " << i;
}

TEST_F(TraceEncoding, BFloat16RoundsToNearestEven) {
  const float ulp = std::ldexp(1.0f, -7);  // bf16 spacing in [1, 2)
  const float big = std::ldexp(1.0f + ulp, 100);
  const std::vector<float> got = round_trip(DType::kBF16, {1.0f + 0.5f * ulp, 1.0f + 1.5f * ulp, 1.0f + 0.75f * ulp,
                                                            big, -0.0f, std::ldexp(1.0f, -133)});
  const std::vector<float> want = {1.0f, 1.0f + 2 * ulp, 1.0f + ulp, big, -0.0f, std::ldexp(1.0f, -133)};
  ASSERT_EQ(want.size(), got.size());
  for (std::size_t i = 0; i < want.size(); ++i)
    EXPECT_EQ(std::bit_cast<std::uint32_t>(want[i]), std::bit_cast<std::uint32_t>(got[i])) << "value " << i;
}

TEST_F(TraceEncoding, Float32IsStoredExactly) {
  const std::vector<float> values = {0.1f, -3.4e38f, std::numeric_limits<float>::denorm_min(), -0.0f, 1.0f / 3.0f};
  const std::vector<float> got = round_trip(DType::kF32, values);
  for (std::size_t i = 0; i < values.size(); ++i)
    EXPECT_EQ(std::bit_cast<std::uint32_t>(values[i]), std::bit_cast<std::uint32_t>(got[i])) << "value " << i;
}

// ---------------------------------------------------------------------------
// Storage layout as documented: chunks of [1, rows, d] along tokens, checksums.

TEST_F(TraceFiles, ChunksSpanWholeRowsAlongTokensWithChecksums) {
  const TraceMeta meta = small_meta(DType::kF16, 5, true);
  std::vector<LayerData> layers;
  for (int l = 0; l < meta.layers; ++l) layers.push_back(random_layer(meta, 7u));
  WriteOptions options;
  options.deflate = true;
  options.chunk_bytes = 10 * 16 * 2;  // 10 rows of 16 fp16 values
  write_trace(file("t.h5"), meta, layers, options);

  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t f = H5Fopen(file("t.h5").c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  const hid_t d = H5Dopen2(f, "/layers/layer_1/prefill/k", H5P_DEFAULT);
  ASSERT_GE(d, 0);
  const hid_t dcpl = H5Dget_create_plist(d);
  hsize_t chunk[3] = {};
  ASSERT_EQ(3, H5Pget_chunk(dcpl, 3, chunk));
  EXPECT_EQ(chunk[0], 1u);
  EXPECT_EQ(chunk[1], 10u);
  EXPECT_EQ(chunk[2], 16u);
  std::vector<H5Z_filter_t> filters;
  for (int i = 0; i < H5Pget_nfilters(dcpl); ++i) {
    unsigned flags = 0;
    size_t n = 0;
    filters.push_back(H5Pget_filter2(dcpl, static_cast<unsigned>(i), &flags, &n, nullptr, 0, nullptr, nullptr));
  }
  EXPECT_EQ(filters, (std::vector<H5Z_filter_t>{H5Z_FILTER_SHUFFLE, H5Z_FILTER_DEFLATE, H5Z_FILTER_FLETCHER32}));
  H5Pclose(dcpl);
  H5Dclose(d);
  H5Fclose(f);
}

TEST_F(TraceFiles, FromMemoryReadsTheSameTrace) {
  const TraceMeta meta = small_meta(DType::kBF16, 4, true);
  std::vector<LayerData> layers;
  for (int l = 0; l < meta.layers; ++l) layers.push_back(random_layer(meta, 99u + static_cast<std::uint32_t>(l)));
  write_trace(file("t.h5"), meta, layers);
  std::ifstream in(file("t.h5"), std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> image(chars.size());
  std::memcpy(image.data(), chars.data(), chars.size());

  const TraceReader from_file(file("t.h5"));
  const TraceReader from_memory = TraceReader::from_memory(image);
  expect_meta_equal(from_file.meta(), from_memory.meta());
  for (int l = 0; l < meta.layers; ++l) {
    const LayerData a = from_file.read_layer(l), b = from_memory.read_layer(l);
    expect_bits_equal(a.prefill_k, b.prefill_k, "prefill/k");
    expect_bits_equal(a.decode_v, b.decode_v, "decode/v");
    expect_bits_equal(*a.attn_colsum, *b.attn_colsum, "attn_colsum");
  }
}

// ---------------------------------------------------------------------------
// The writer refuses what the reader would reject.

template <class F>
void expect_error(F&& f, ErrorKind kind, const std::string& substring) {
  try {
    f();
    FAIL() << "no error; expected one mentioning '" << substring << "'";
  } catch (const Error& e) {
    EXPECT_EQ(static_cast<int>(kind), static_cast<int>(e.kind())) << e.what();
    EXPECT_NE(std::string(e.what()).find(substring), std::string::npos) << e.what();
  }
}

class TraceWriterRejects : public TraceFiles {
 protected:
  TraceMeta meta_ = small_meta(DType::kF16, 2, true);
  LayerData layer_ = random_layer(meta_, 5u);
};

TEST_F(TraceWriterRejects, NaNValue) {
  layer_.prefill_v.data[2 * 16 + 3] = std::nanf("");
  TraceWriter w(file("t.h5"), meta_);
  expect_error([&] { w.write_layer(0, layer_); }, ErrorKind::kBadNumber, "layer 0: prefill/v has NaN at head 0, token 2, dim 3");
}

TEST_F(TraceWriterRejects, ValueOverflowingFloat16) {
  layer_.decode_k.data[0] = 70000.0f;
  TraceWriter w(file("t.h5"), meta_);
  expect_error([&] { w.write_layer(0, layer_); }, ErrorKind::kBadNumber, "overflows float16");
}

TEST_F(TraceWriterRejects, NegativeColsum) {
  layer_.attn_colsum->data[5] = -0.25f;
  TraceWriter w(file("t.h5"), meta_);
  expect_error([&] { w.write_layer(0, layer_); }, ErrorKind::kBadNumber, "negative value -0.25");
}

TEST_F(TraceWriterRejects, WrongShape) {
  layer_.prefill_k = Tensor({3, meta_.prompt_len, meta_.head_dim});
  TraceWriter w(file("t.h5"), meta_);
  expect_error([&] { w.write_layer(0, layer_); }, ErrorKind::kTraceInvalid, "prefill/k has shape [3, 37, 16], expected [2, 37, 16]");
}

TEST_F(TraceWriterRejects, OptionalDatasetNotDeclared) {
  meta_.has_decode_outputs = false;
  TraceWriter w(file("t.h5"), meta_);
  expect_error([&] { w.write_layer(0, layer_); }, ErrorKind::kTraceInvalid, "decode/o is given but has_decode_outputs = 0");
}

TEST_F(TraceWriterRejects, QHeadsNotMultipleOfKvHeads) {
  meta_.q_heads = 3;
  expect_error([&] { TraceWriter w(file("t.h5"), meta_); }, ErrorKind::kTraceInvalid, "not a multiple of kv_heads");
}

TEST_F(TraceWriterRejects, MissingLayerLeavesAFileTheReaderRejects) {
  {
    TraceWriter w(file("t.h5"), meta_);
    w.write_layer(0, layer_);
    expect_error([&] { w.close(); }, ErrorKind::kTraceInvalid, "layer 1 was never written");
  }
  expect_error([&] { TraceReader r(file("t.h5")); }, ErrorKind::kTraceInvalid, "'schema' is missing");
}

TEST_F(TraceWriterRejects, LayerOutOfRangeAndTwice) {
  TraceWriter w(file("t.h5"), meta_);
  expect_error([&] { w.write_layer(3, layer_); }, ErrorKind::kUsage, "out of range");
  w.write_layer(1, layer_);
  expect_error([&] { w.write_layer(1, layer_); }, ErrorKind::kUsage, "already written");
}

// ---------------------------------------------------------------------------
// Plan dumps.

Plan merge_plan() {
  Plan p;
  p.n = 10;
  p.add_kept(0);
  const std::int64_t toks[] = {3, 4, 5};
  const double ck[] = {0.25, 0.5, 0.25};
  const double cv[] = {0.2, 0.6, 0.2};
  p.add_row(toks, ck, cv, 4, 3);
  p.add_kept(9);
  return p;
}

void expect_plan_equal(const Plan& a, const Plan& b, const std::string& what) {
  EXPECT_EQ(a.n, b.n) << what;
  EXPECT_EQ(a.row_ptr, b.row_ptr) << what;
  EXPECT_EQ(a.token, b.token) << what;
  EXPECT_EQ(a.coef_k, b.coef_k) << what;
  EXPECT_EQ(a.coef_v, b.coef_v) << what;
  EXPECT_EQ(a.position, b.position) << what;
  EXPECT_EQ(a.count, b.count) << what;
  EXPECT_EQ(a.positions, b.positions) << what;
}

TEST_F(TraceFiles, PlanDumpRoundTrip) {
  struct Entry {
    std::string method, budget, stage;
    int layer, head;
    Plan plan;
  };
  Plan rerotated;
  rerotated.n = 6;
  rerotated.positions = PositionMode::kRerotated;
  rerotated.add_kept(1);
  rerotated.add_kept(5);
  const std::int64_t kept[] = {0, 2, 7};
  Plan empty;
  empty.n = 4;
  // Added out of order: the reader returns run, layer, head, stage order.
  const std::vector<Entry> added = {
      {"kvmerger", "ratio=0.5", "final", 0, 1, merge_plan()},
      {"kvmerger", "ratio=0.5", "prefill", 0, 1, Plan::identity(10)},
      {"kvmerger", "ratio=0.5", "prefill", 0, 0, Plan::keep(8, kept)},
      {"streaming_llm", "tokens=2", "prefill", 11, 0, rerotated},
      {"kvmerger", "ratio=0.5", "prefill", 2, 0, empty},
  };
  {
    PlanDumpWriter w(file("plans.h5"));
    for (const Entry& e : added) w.add(e.method, e.budget, e.layer, e.head, e.stage, e.plan);
    w.close();
  }
  const std::vector<PlanDumpRecord> got = read_plan_dumps(file("plans.h5"));
  const std::vector<std::size_t> order = {2, 1, 0, 4, 3};
  ASSERT_EQ(got.size(), order.size());
  for (std::size_t i = 0; i < order.size(); ++i) {
    const Entry& e = added[order[i]];
    const std::string what = "record " + std::to_string(i);
    EXPECT_EQ(got[i].method, e.method) << what;
    EXPECT_EQ(got[i].budget, e.budget) << what;
    EXPECT_EQ(got[i].stage, e.stage) << what;
    EXPECT_EQ(got[i].layer, e.layer) << what;
    EXPECT_EQ(got[i].kv_head, e.head) << what;
    expect_plan_equal(e.plan, got[i].plan, what);
  }
}

TEST_F(TraceFiles, PlanDumpRejectsDuplicatesBadStagesAndMalformedPlans) {
  PlanDumpWriter w(file("plans.h5"));
  w.add("h2o", "tokens=4", 0, 0, "prefill", Plan::identity(4));
  expect_error([&] { w.add("h2o", "tokens=4", 0, 0, "prefill", Plan::identity(4)); }, ErrorKind::kUsage,
               "already dumped");
  expect_error([&] { w.add("h2o", "tokens=4", 0, 0, "decode", Plan::identity(4)); }, ErrorKind::kUsage,
               "not prefill or final");
  Plan bad = Plan::identity(4);
  bad.token[2] = 4;
  expect_error([&] { w.add("h2o", "tokens=4", 0, 1, "final", bad); }, ErrorKind::kInvariant, "outside [0, n = 4)");
  bad = Plan::identity(4);
  bad.count.pop_back();
  expect_error([&] { w.add("h2o", "tokens=4", 0, 1, "final", bad); }, ErrorKind::kInvariant, "position/count");
  w.close();
  EXPECT_EQ(read_plan_dumps(file("plans.h5")).size(), 1u);
  expect_error([&] { read_plan_dumps(file("missing.h5")); }, ErrorKind::kIo, "no such file");
}

}  // namespace
}  // namespace kvscope::traces
