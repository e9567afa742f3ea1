// The MLP's work items: tiles of the two FCs (and their transposes in the backward),
// each output summed in a fixed order, with an epilogue per stage.
#pragma once

#include "se_cuda_launch.cuh"

namespace se_kernels::cuda {
namespace detail {

// Samples of an MLP item's tile that exist: kTile, fewer at the end of the batch, or none.
__device__ __forceinline__ int tile_samples(int64_t N, int64_t n0) {
  const int64_t left = N - n0;
  return left <= 0 ? 0 : left < kTile ? static_cast<int>(left) : kTile;
}

// The partial sums of one output over an item's samples: acc[t] = the sum of
// weight(k) * in[t * K + k] over k = k0, k0 + stride, ... < K, in that order, for the nt
// samples t < nt that exist, and 0 for the others; 0 throughout when !valid (a thread past
// the last output, which still takes part in combining the threads' sums). `in` points at
// the item's first sample in an accumulation-dtype [N, K] input.
template <typename A, typename Weight>
__device__ __forceinline__ void tile_dots(A (&acc)[kTile], bool valid, const A* in, int64_t K,
                                          int64_t k0, int64_t stride, int nt,
                                          const Weight& weight) {
#pragma unroll
  for (int t = 0; t < kTile; ++t) acc[t] = A(0);
  if (!valid) return;
  for (int64_t k = k0; k < K; k += stride) {
    const A wv = weight(k);
#pragma unroll
    for (int t = 0; t < kTile; ++t)
      if (t < nt) acc[t] += wv * ld_fresh(in + t * K + k);
  }
}

// ---- the MLP items ----------------------------------------------------------------------

// out[n, r] = epilogue(sum_k W[r, k] * in[n, k]) for a [R, K] row-major weight and an
// accumulation-dtype [N, K] input. A group of `lanes` threads takes one row r and kTile
// samples; the sum runs over k in lane-strided order, then a butterfly across the lanes:
// the same order for every call of the same shape.
template <typename T, typename Epilogue>
__device__ __forceinline__ void rows_dot_item(const T* weight, const acc_t<T>* in, int64_t N,
                                              int64_t R, int64_t K, const MlpTiling& tiling,
                                              const Epilogue& epilogue, int64_t block) {
  using A = acc_t<T>;
  const int lanes = tiling.lanes;
  const int64_t n0 = (block / tiling.blocks) * kTile;
  const int64_t r = (block % tiling.blocks) * (kThreads / lanes) + threadIdx.x / lanes;
  const int sub = threadIdx.x % lanes;
  const int nt = tile_samples(N, n0);
  A acc[kTile];
  tile_dots(acc, r < R, in + n0 * K, K, sub, lanes, nt,
            [&](int64_t k) { return to_acc(weight[r * K + k]); });
#pragma unroll
  for (int t = 0; t < kTile; ++t)
    for (int offset = lanes / 2; offset > 0; offset /= 2)
      acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], offset);
  if (r < R && sub == 0) {
#pragma unroll
    for (int t = 0; t < kTile; ++t)
      if (t < nt) epilogue(n0 + t, r, acc[t]);
  }
}

// out[n, col] = epilogue(sum_k in[n, k] * W[k, col]) for a [K, Cols] row-major weight:
// the weight read along its rows (coalesced) for the products with W rather than W^T.
// A CTA takes 32 columns (the lanes) and kTile samples; its 8 warps take interleaved k,
// combined in warp order through shared memory.
template <typename T, typename Epilogue>
__device__ __forceinline__ void cols_dot_item(const T* weight, const acc_t<T>* in, int64_t N,
                                              int64_t K, int64_t cols, const MlpTiling& tiling,
                                              const Epilogue& epilogue, int64_t block) {
  using A = acc_t<T>;
  constexpr int kWarps = kThreads / 32;
  const int64_t n0 = (block / tiling.blocks) * kTile;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t col = (block % tiling.blocks) * 32 + lane;
  const int nt = tile_samples(N, n0);
  A acc[kTile];
  tile_dots(acc, col < cols, in + n0 * K, K, warp, kWarps, nt,
            [&](int64_t k) { return to_acc(weight[k * cols + col]); });
  SE_SHARED(A, red, [kWarps][kTile][32]);
#pragma unroll
  for (int t = 0; t < kTile; ++t) red[warp][t][lane] = acc[t];
  __syncthreads();
  if (warp == 0 && col < cols) {
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      if (t >= nt) continue;
      A v = red[0][t][lane];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) v += red[w][t][lane];
      epilogue(n0 + t, col, v);
    }
  }
  __syncthreads();  // `red` is reused by the CTA's next item
}

}  // namespace detail
}  // namespace se_kernels::cuda
