// Element types on the device: the accumulation type of each dtype, conversions, loads
// that bypass the non-coherent caches, and the 16-byte packs the streaming passes move.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "se_cuda.h"

namespace se_kernels::cuda {
namespace detail {

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- dtypes -------------------------------------------------------------------------

template <typename T>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };
template <typename T>
using acc_t = typename Acc<T>::type;

// torch builds with __CUDA_NO_HALF_CONVERSIONS__: convert with the intrinsics.
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  __device__ static float to(float v) { return v; }
  __device__ static float from(float v) { return v; }
};
template <>
struct Convert<double> {
  __device__ static double to(double v) { return v; }
  __device__ static double from(double v) { return v; }
};
template <>
struct Convert<__half> {
  __device__ static float to(__half v) { return __half2float(v); }
  __device__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Convert<__nv_bfloat16> {
  __device__ static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) { return Convert<T>::to(v); }
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) { return Convert<T>::from(v); }

// A value another CTA of the same launch wrote (after the sync of pipeline_kernel): from L2.
template <typename V>
__device__ __forceinline__ V ld_fresh(const V* p) {
  if constexpr (sizeof(V) == 2) {  // no __ldcg for 16-bit types: load the bits
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    V v;
    memcpy(&v, &bits, 2);
    return v;
  } else {
    return __ldcg(p);
  }
}

// `width` consecutive elements moved as one access (16 bytes for the vector path).
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};
// 16-byte packs move as one uint4 (the intrinsics keep the compiler from splitting the
// access). Tensors no kernel of the op writes go through the non-coherent cache (__ldg);
// `Fresh` ones, written earlier in the same launch by another CTA, are read from L2.
template <int W, bool Fresh = false, typename T>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p) {
  if constexpr (sizeof(Pack<T, W>) == 16) {
    const auto* q = reinterpret_cast<const uint4*>(p);
    uint4 bits;
    if constexpr (Fresh) bits = __ldcg(q);
    else bits = __ldg(q);
    Pack<T, W> v;
    memcpy(&v, &bits, 16);
    return v;
  } else if constexpr (Fresh) {
    Pack<T, W> v;
#pragma unroll
    for (int i = 0; i < W; ++i) v.v[i] = ld_fresh(p + i);
    return v;
  } else {
    return *reinterpret_cast<const Pack<T, W>*>(p);
  }
}
template <int W, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, W>& v) {
  if constexpr (sizeof(Pack<T, W>) == 16) {
    uint4 bits;
    memcpy(&bits, &v, 16);
    __stwb(reinterpret_cast<uint4*>(p), bits);
  } else {
    *reinterpret_cast<Pack<T, W>*>(p) = v;
  }
}

template <typename T>
constexpr int vector_width() { return 16 / static_cast<int>(sizeof(T)); }

}  // namespace detail
}  // namespace se_kernels::cuda
