// Shared by the CUDA kernel sources: error checks, storage loads/stores,
// dtype dispatch, deterministic warp reductions, vector loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

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

constexpr int kBlock = 256;  // threads of the element-wise and per-row kernels (a power of two)

/// Sum / max over the 32 lanes of a warp by an xor butterfly: a fixed order,
/// every lane gets the result.
__device__ __forceinline__ float warp_sum(float x) {
  for (int m = 16; m > 0; m /= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int m = 16; m > 0; m /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}

/// Vector loads and stores of N consecutive storage elements as fp32: one
/// 16-byte (or 8-byte) access when N elements fill exactly that, so p must be
/// aligned to it; element by element otherwise.
template <class S>
constexpr int kVec = 16 / static_cast<int>(sizeof(S));  // storage elements per 16 bytes

template <class S, int N>
__device__ __forceinline__ void load_n(const S* p, float* out) {
  constexpr int kBytes = N * static_cast<int>(sizeof(S));
  if constexpr (kBytes == 16 || kBytes == 8) {
    using Raw = std::conditional_t<kBytes == 16, uint4, uint2>;
    const Raw raw = *reinterpret_cast<const Raw*>(p);
    const S* e = reinterpret_cast<const S*>(&raw);
#pragma unroll
    for (int u = 0; u < N; ++u) out[u] = load(e, u);
  } else {
#pragma unroll
    for (int u = 0; u < N; ++u) out[u] = load(p, u);
  }
}
template <class S, int N>
__device__ __forceinline__ void store_n(const float* x, S* p) {
  if constexpr (N == kVec<S>) {
    uint4 raw;
    S* e = reinterpret_cast<S*>(&raw);
#pragma unroll
    for (int u = 0; u < N; ++u) e[u] = store_as<S>(x[u]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int u = 0; u < N; ++u) p[u] = store_as<S>(x[u]);
  }
}

/// Dynamic shared memory a block may use on the current device once a kernel
/// opts in (cudaDevAttrMaxSharedMemoryPerBlockOptin: ~227 KiB on sm_90).
inline int shared_optin_bytes() {
  int dev = 0, bytes = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
  return bytes;
}

/// Lets `kernel` take `dynamic` bytes of dynamic shared memory beside its
/// `static_bytes`: the opt-in CUDA needs once a block's total passes 48 KiB.
template <class Kernel>
void allow_dynamic_shared(Kernel* kernel, std::size_t dynamic, std::size_t static_bytes, const char* what) {
  if (dynamic + static_bytes > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic)), what);
}

/// Whether every pointer is aligned to `bytes` (vector loads need it; cudaMalloc gives 256).
inline bool aligned(std::size_t bytes, std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) return false;
  return true;
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
