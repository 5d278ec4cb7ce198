// The score kernels of the score-then-top-k methods on the GPU
// (ScoreKernels over optimized/cuda). Built with CUDA, each call uploads the
// layer's q and k in their storage dtype, runs the kernel on the current
// device and downloads the fp32 scores; the scorers and the selection around
// them are cpu_methods.cpp's. Built without CUDA, asking for them is one
// clear usage error.
#include "kvscope/core/error.hpp"
#include "kvscope/opt/backend.hpp"

#if KVSCOPE_BACKEND_CUDA
#include "kvscope/opt/cpu/storage.hpp"
#include "kvscope/opt/cuda/device.hpp"
#include "kvscope/opt/cuda/kernels.hpp"
#endif

namespace kvscope::opt {

#if KVSCOPE_BACKEND_CUDA
namespace {

/// A storage buffer's bytes on the device.
cuda::DeviceBuffer upload(const StorageBuffer& b) {
  cuda::DeviceBuffer d;
  cpu::dispatch_storage(b.dtype(), [&](auto tag) {
    using S = decltype(tag);
    d = cuda::DeviceBuffer(static_cast<std::size_t>(b.size()) * sizeof(S));
    d.upload(b.data<S>(), d.bytes());
  });
  return d;
}

class CudaScoreKernels final : public ScoreKernels {
 public:
  std::vector<float> window_scores(const LayerStorage& in, std::int64_t window, kern::Reduce rows) const override {
    const cuda::DeviceBuffer q = upload(in.q), k = upload(in.k);
    cuda::DeviceBuffer out(static_cast<std::size_t>(in.shape.q_heads * in.shape.tokens) * sizeof(float));
    cuda::window_scores(in.shape, in.k.dtype(), q.get(), k.get(), window, rows, out.as<float>());
    return out.to_vector<float>(out.bytes() / sizeof(float));
  }
  std::vector<float> accumulated_attention(const LayerStorage& in) const override {
    const cuda::DeviceBuffer q = upload(in.q), k = upload(in.k);
    cuda::DeviceBuffer out(static_cast<std::size_t>(in.shape.q_heads * in.shape.tokens) * sizeof(float));
    cuda::accumulated_attention(in.shape, in.k.dtype(), q.get(), k.get(), false, out.as<float>());
    return out.to_vector<float>(out.bytes() / sizeof(float));
  }
  std::vector<float> key_norm_scores(const LayerStorage& in) const override {
    const cuda::DeviceBuffer k = upload(in.k);
    cuda::DeviceBuffer out(static_cast<std::size_t>(in.shape.kv_heads * in.shape.tokens) * sizeof(float));
    cuda::key_norm_scores(in.shape, in.k.dtype(), k.get(), out.as<float>());
    return out.to_vector<float>(out.bytes() / sizeof(float));
  }
};

}  // namespace

const ScoreKernels& cuda_score_kernels() {
  std::string why;
  if (!cuda::device_available(&why)) throw Error(ErrorKind::kUsage, "--backend cuda: no CUDA device (" + why + ")");
  static const CudaScoreKernels kernels;
  return kernels;
}
#else
const ScoreKernels& cuda_score_kernels() {
  throw Error(ErrorKind::kUsage,
              "--backend cuda: this kvscope was built without CUDA (no nvcc at configure time; "
              "-DKVSCOPE_ENABLE_CUDA=ON to require it)");
}
#endif

}  // namespace kvscope::opt
