// Shared by the CUDA kernel sources: error checks, storage loads/stores,
// dtype dispatch, deterministic block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "kvscope/core/dtype_kind.hpp"
#include "kvscope/core/error.hpp"

namespace kvscope::opt::cuda::detail {

inline void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess)
    throw Error(ErrorKind::kInternal, std::string("CUDA: ") + what + ": " + cudaGetErrorString(rc));
}
/// After a launch: configuration errors now, execution errors at the next sync.
#define KVSCOPE_CUDA_LAUNCHED(what) ::kvscope::opt::cuda::detail::check(cudaGetLastError(), what)

__device__ __forceinline__ float load(const float* p, std::int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, std::int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, std::int64_t i) { return __bfloat162float(p[i]); }

template <class S>
__device__ __forceinline__ S store_as(float x);
template <>
__device__ __forceinline__ float store_as<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half store_as<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

/// Calls f(S{}) with the device storage type of `t` (the CPU's dispatch_storage).
template <class F>
decltype(auto) dispatch(DType t, F&& f) {
  switch (t) {
    case DType::kF16: return f(__half{});
    case DType::kBF16: return f(__nv_bfloat16{});
    case DType::kF32: break;
  }
  return f(float{});
}

constexpr int kBlock = 256;  // threads of the reduction kernels (a power of two)

/// Sum / max of one value per thread over the block, in a fixed tree: the same
/// bits on every run. Every thread gets the result. `scratch`: kBlock floats.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  scratch[threadIdx.x] = x;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
    __syncthreads();
  }
  const float r = scratch[0];
  __syncthreads();
  return r;
}
__device__ __forceinline__ float block_max(float x, float* scratch) {
  scratch[threadIdx.x] = x;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) scratch[threadIdx.x] = fmaxf(scratch[threadIdx.x], scratch[threadIdx.x + s]);
    __syncthreads();
  }
  const float r = scratch[0];
  __syncthreads();
  return r;
}

inline unsigned grid_for(std::int64_t n, int block) { return static_cast<unsigned>((n + block - 1) / block); }

/// Stream-ordered scratch memory, freed in the destructor (also on throw).
template <class T>
class Scratch {
 public:
  Scratch(std::int64_t n, cudaStream_t stream) : stream_(stream) {
    if (n > 0) check(cudaMallocAsync(reinterpret_cast<void**>(&p_), static_cast<std::size_t>(n) * sizeof(T), stream),
                     "cudaMallocAsync");
  }
  ~Scratch() {
    if (p_) cudaFreeAsync(p_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace kvscope::opt::cuda::detail
