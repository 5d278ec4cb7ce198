// The cuda backend end to end (opt::make_cuda_method: the score-then-top-k
// families with their score kernels on the GPU). Without a device: one clear
// usage error for every family. With one: every family passes the
// differential verification against the reference on the bundled sample
// trace, the check `kvscope verify TRACE --backend cuda` makes.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "kvscope/core/budget.hpp"
#include "kvscope/core/error.hpp"
#include "kvscope/core/method_spec.hpp"
#include "kvscope/opt/backend.hpp"
#include "kvscope/opt/cuda/device.hpp"
#include "kvscope/reference/registry.hpp"
#include "kvscope/traces/trace_io.hpp"
#include "kvscope/verify/harness.hpp"

using namespace kvscope;

namespace {
/// The bundled sample trace: $KVSCOPE_SAMPLE_TRACE (scripts/gpu-check sets it), else the source tree's.
std::string sample_trace() {
  const char* p = std::getenv("KVSCOPE_SAMPLE_TRACE");
  return p && *p ? p : KVSCOPE_SAMPLE_TRACE;
}
}  // namespace

TEST(CudaBackend, WithoutADeviceEveryFamilyIsOneClearUsageError) {
  std::string why;
  if (opt::cuda::device_available(&why)) GTEST_SKIP() << "a CUDA device is present";
  ASSERT_FALSE(opt::cuda_families().empty());
  for (const std::string& f : opt::cuda_families()) {
    try {
      opt::make_cuda_method(MethodSpec::parse(f));
      ADD_FAILURE() << f << ": made without a device";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kUsage) << f;
      EXPECT_NE(std::string(e.what()).find("no CUDA device"), std::string::npos) << f << ": " << e.what();
    }
  }
}

TEST(CudaBackend, EveryFamilyPassesVerifyOnTheSampleTrace) {
  std::string why;
  if (!opt::cuda::device_available(&why)) GTEST_SKIP() << "no CUDA device: " << why;
  const traces::TraceReader trace(sample_trace());
  const TraceMeta& meta = trace.meta();
  for (const std::string& f : opt::cuda_families()) {
    const MethodSpec spec = MethodSpec::parse(f);
    const auto reference = ref::make_method(spec);
    const auto backend = opt::make_cuda_method(spec);
    for (const Budget& b : Budget::parse_list("50%,25%"))
      for (int l = 0; l < meta.layers; ++l) {
        const verify::LayerVerdict v =
            verify::verify_layer(*reference, *backend, meta, l, trace.read_layer(l), b.resolve(meta.prompt_len));
        EXPECT_TRUE(v.pass()) << f << " @ " << b.label() << " layer " << l << ": " << v.failure;
      }
  }
}
