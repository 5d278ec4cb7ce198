// KVSCOPE_HD marks per-element math shared by the CPU and CUDA backends:
// __host__ __device__ under nvcc, plain inline elsewhere (CUTLASS_HOST_DEVICE style).
#pragma once

#if defined(__CUDACC__)
#define KVSCOPE_HD __host__ __device__ __forceinline__
#else
#define KVSCOPE_HD inline
#endif
