// store_row (the vectorised fp32 -> storage conversion) against the scalar
// from_f32<S> it replaces: bit for bit, NaN, inf, -0 and subnormals included.
// KVSCOPE_EXHAUSTIVE_STORE=1 checks all 2^32 fp32 inputs (seconds per dtype).
#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "kvscope/opt/cpu/storage.hpp"

using namespace kvscope::opt::cpu;

namespace {

template <class S>
std::uint16_t bits(S x) {
  std::uint16_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

/// Number of inputs whose store_row bits differ from from_f32<S>'s. The
/// length (13) is odd so both the vector body and the scalar tail run.
template <class S>
std::int64_t mismatches(const std::vector<std::uint32_t>& inputs) {
  constexpr std::size_t kChunk = 13;
  std::int64_t bad = 0;
  std::vector<float> x(kChunk);
  std::vector<S> got(kChunk);
  for (std::size_t at = 0; at < inputs.size(); at += kChunk) {
    const std::size_t n = std::min(kChunk, inputs.size() - at);
    for (std::size_t i = 0; i < n; ++i) x[i] = std::bit_cast<float>(inputs[at + i]);
    store_row(x.data(), static_cast<std::int64_t>(n), got.data());
    for (std::size_t i = 0; i < n; ++i) bad += bits(got[i]) != bits(from_f32<S>(x[i]));
  }
  return bad;
}

/// Every sign and exponent with the mantissa patterns at which rounding to 16
/// bits changes (halfway points, their neighbours, all-ones), NaN payloads
/// included, plus a million random bit patterns.
std::vector<std::uint32_t> edge_and_random_inputs() {
  std::vector<std::uint32_t> in;
  const std::uint32_t lows[] = {0x0, 0x1, 0xfff, 0x1000, 0x1001, 0x1fff, 0x2000, 0x2001, 0x3000, 0x7fff, 0x8000,
                                0x8001, 0xbfff, 0xc000, 0xffff, 0x10000, 0x18000, 0x7fffff, 0x400000, 0x3fffff};
  for (std::uint32_t hi = 0; hi < 512; ++hi)  // sign and exponent
    for (std::uint32_t mid = 0; mid < 128; mid += 7)
      for (std::uint32_t low : lows) in.push_back((hi << 23) | (((mid << 16) | low) & 0x7fffffu));
  std::mt19937 rng(20261201);
  for (int i = 0; i < 1 << 20; ++i) in.push_back(static_cast<std::uint32_t>(rng()));
  return in;
}

template <class S>
void expect_all_fp32_inputs_match() {
  std::int64_t bad = 0;
#pragma omp parallel for reduction(+ : bad) schedule(dynamic)
  for (std::int64_t hi = 0; hi < (std::int64_t{1} << 16); ++hi) {
    std::vector<std::uint32_t> in(1 << 16);
    for (std::uint32_t lo = 0; lo < (1u << 16); ++lo) in[lo] = static_cast<std::uint32_t>(hi) << 16 | lo;
    bad += mismatches<S>(in);
  }
  EXPECT_EQ(bad, 0);
}

}  // namespace

TEST(CpuStorage, StoreRowEqualsScalarConversionOnEdgesAndRandomBits) {
  const std::vector<std::uint32_t> in = edge_and_random_inputs();
  EXPECT_EQ(mismatches<f16>(in), 0);
  EXPECT_EQ(mismatches<bf16>(in), 0);
  std::vector<float> x(in.size()), y(in.size());
  for (std::size_t i = 0; i < in.size(); ++i) x[i] = std::bit_cast<float>(in[i]);
  store_row(x.data(), static_cast<std::int64_t>(x.size()), y.data());
  EXPECT_EQ(std::memcmp(x.data(), y.data(), x.size() * sizeof(float)), 0);
}

TEST(CpuStorage, StoreRowEqualsScalarConversionOnEveryFloatWhenAsked) {
  const char* on = std::getenv("KVSCOPE_EXHAUSTIVE_STORE");
  if (on == nullptr || std::string(on) != "1") GTEST_SKIP() << "set KVSCOPE_EXHAUSTIVE_STORE=1 for all 2^32 inputs";
  expect_all_fp32_inputs_match<f16>();
  expect_all_fp32_inputs_match<bf16>();
}

// stream_copy takes the streaming-store path only for a 16-byte-aligned
// destination and a multiple of 16 bytes: every alignment and length around
// those edges must write exactly the source bytes and nothing beside them.
TEST(CpuStorage, StreamCopyWritesExactlyTheSourceBytesAtEveryAlignment) {
  std::vector<unsigned char> src(160);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<unsigned char>(i * 37 + 11);
  alignas(64) unsigned char dst[256];
  for (std::size_t offset = 0; offset < 32; ++offset)
    for (std::size_t bytes = 0; bytes <= 128; ++bytes) {
      std::memset(dst, 0xA5, sizeof dst);
      stream_copy(dst + offset, src.data() + 3, bytes);
      stream_fence();
      ASSERT_EQ(std::memcmp(dst + offset, src.data() + 3, bytes), 0) << "offset " << offset << ", bytes " << bytes;
      for (std::size_t i = 0; i < sizeof dst; ++i) {
        if (i < offset || i >= offset + bytes) {
          ASSERT_EQ(dst[i], 0xA5) << "byte " << i << " written outside the copy";
        }
      }
    }
}
