// Device helpers and the two streaming passes shared by se_forward.cu and se_backward.cu.
//
// Both directions make two passes over x-sized tensors with an O(N*C*S) MLP between them:
//   reduce pass: per (n, c), fold Terms over the spatial positions (pool; sum dy*x)
//   map pass:    per element, an Op of the element and per-channel values (scale; dx)
// Each pass walks x in its own layout:
//   NCHW:          a row (n, c) holds P contiguous elements. A group of `lanes` threads of
//                  one warp (a power of two, sized to the row) walks one row; rows are
//                  consecutive, so a warp reads one contiguous span.
//   channels-last: a pixel (n, p) holds C contiguous channels. A CTA has tc x tp threads:
//                  tc threads cover a block of channels, each `width` wide, and tp of them
//                  walk interleaved pixels; per-channel values stay in registers.
// Rows (NCHW) or pixels (channels-last) are split into `pieces` when the batch alone gives
// too few CTAs (small N); a reduce pass then writes per-piece partials that a second
// kernel combines in piece order. Every reduction has a fixed order that depends only on
// the shapes: results are bitwise reproducible, and no atomics are used.
//
// Indices into x-sized tensors are int64 throughout.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>

#include "se_cuda.h"

namespace se_kernels::cuda {
namespace detail {

constexpr int kThreads = 256;      // every kernel's CTA size (at most)
constexpr int kTargetCtasPerSm = 8;  // a pass is split until it has this many CTAs per SM
constexpr int kUnitsPerLane = 4;   // accesses per thread below which splitting stops
constexpr int kBatch = 4;          // loads a thread issues before using any of them
constexpr int kTile = 8;           // samples per CTA in the MLP kernels

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

// `width` consecutive elements moved as one access (16 bytes for the vector path).
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};
// 16-byte packs move as one uint4 (the intrinsics keep the compiler from splitting the
// access); the streaming passes only read tensors that no kernel of the op writes.
template <int W, typename T>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p) {
  if constexpr (sizeof(Pack<T, W>) == 16) {
    const uint4 bits = __ldg(reinterpret_cast<const uint4*>(p));
    Pack<T, W> v;
    memcpy(&v, &bits, 16);
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

// ---- the activations and gates, and their derivatives (DESIGN.md §1.3) ---------------

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }

template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {  // torch.amax propagates NaN
  return (a > b || isnan(a)) ? a : b;
}
template <typename A>
__device__ __forceinline__ A sigmoid_(A v) { return A(1) / (A(1) + exp_(-v)); }
template <typename A>
__device__ __forceinline__ A activation(A a, Activation kind) {
  if (kind == Activation::SiLU) return a / (A(1) + exp_(-a));
  return a < A(0) ? A(0) : a;  // relu keeps NaN, as torch's
}
// d activation(a) / da applied to the incoming gradient dh.
template <typename A>
__device__ __forceinline__ A activation_backward(A a, A dh, Activation kind) {
  if (kind == Activation::ReLU) return a > A(0) ? dh : A(0);
  const A sig = sigmoid_(a);
  return dh * sig * (A(1) + a * (A(1) - sig));
}
template <typename A>
__device__ __forceinline__ A gate(A g, Gate kind) {
  if (kind == Gate::Sigmoid) return sigmoid_(g);
  A t = g + A(3);  // comparisons rather than fmin/fmax so NaN stays NaN, as in torch
  t = t < A(0) ? A(0) : t;
  t = t > A(6) ? A(6) : t;
  return t / A(6);
}
// d gate(g) / dg applied to ds, given s = gate(g). Hardsigmoid uses torch's open interval.
template <typename A>
__device__ __forceinline__ A gate_backward(A g, A s, A ds, Gate kind) {
  if (kind == Gate::HardSigmoid) return (g > A(-3) && g < A(3)) ? ds / A(6) : A(0);
  return ds * s * (A(1) - s);
}

// ---- planning a streaming pass ------------------------------------------------------

struct PassPlan {
  bool channels_last;
  int width;          // elements per access (the Terms/Op template width is chosen from it)
  int threads;        // CTA size
  int64_t ctas;       // flat grid size
  int pieces;         // spatial pieces per row (NCHW) or per (sample, channel block)
  int64_t piece_len;  // elements (NCHW) or pixels (channels-last) per piece
  // NCHW
  int lanes;            // threads per row
  int64_t row_blocks;   // CTAs along the rows
  // channels-last
  int tc, tp;           // channel vectors x pixel lanes per CTA
  int64_t cblocks;      // channel blocks per sample
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Threads per NCHW row: enough that each does about kUnitsPerLane accesses, at most a warp.
inline int lanes_for(int64_t units) {
  int lanes = 1;
  while (lanes < 32 && lanes * kUnitsPerLane < units) lanes *= 2;
  return lanes;
}

// How a pass over `n` samples of C x P elements is split across CTAs (see the file comment).
inline PassPlan plan_pass(int64_t n, int64_t C, int64_t P, bool channels_last, int width,
                          int sm_count) {
  const int64_t target = int64_t(sm_count) * kTargetCtasPerSm;
  PassPlan p{};
  p.channels_last = channels_last;
  p.width = width;
  if (!channels_last) {
    const int64_t units = P / width;  // width divides P on the vector path
    const int64_t rows = n * C;
    const int64_t unsplit = ceil_div(rows, kThreads / lanes_for(units));
    const int64_t max_pieces = std::max<int64_t>(1, units / (32 * kUnitsPerLane));
    const int64_t want = std::clamp<int64_t>(ceil_div(target, unsplit), 1, max_pieces);
    const int64_t piece_units = ceil_div(units, want);
    p.pieces = static_cast<int>(ceil_div(units, piece_units));
    p.piece_len = piece_units * width;
    p.lanes = lanes_for(piece_units);
    p.row_blocks = ceil_div(rows, kThreads / p.lanes);
    p.threads = kThreads;
    p.ctas = p.row_blocks * p.pieces;
  } else {
    const int64_t cvecs = C / width;  // width divides C on the vector path
    p.cblocks = ceil_div(cvecs, kThreads);
    p.tc = static_cast<int>(ceil_div(cvecs, p.cblocks));
    p.tp = std::max(1, kThreads / p.tc);
    p.threads = static_cast<int>(ceil_div(int64_t(p.tc) * p.tp, 32) * 32);
    const int64_t unsplit = n * p.cblocks;
    const int64_t max_pieces = std::max<int64_t>(1, P / (int64_t(p.tp) * kUnitsPerLane));
    const int64_t want = std::clamp<int64_t>(ceil_div(target, unsplit), 1, max_pieces);
    p.piece_len = ceil_div(P, want);
    p.pieces = static_cast<int>(ceil_div(P, p.piece_len));
    p.ctas = unsplit * p.pieces;
  }
  TORCH_CHECK(p.ctas <= INT_MAX, "se_kernels: the cuda backend cannot split a tensor of ", n,
              " x ", C, " x ", P, " elements into fewer than 2^31 blocks");
  return p;
}

// Scratch for a reduce pass's partials: kQ values per (piece, sample, channel).
inline int64_t partial_elems(const PassPlan& p, int64_t n, int64_t C, int kQ) {
  return p.pieces > 1 ? int64_t(kQ) * p.pieces * n * C : 0;
}

// Scratch for the partials of a reduce pass (2 values each) over any group of `plan`: a
// full group or the last, smaller one, which may split its rows more.
inline int64_t group_partial_elems(const Problem& problem, const Plan& plan) {
  int64_t elems = 0;
  for (const int64_t n : {min64(plan.group, problem.N), problem.N % plan.group}) {
    if (n == 0) continue;
    const PassPlan pass =
        plan_pass(n, problem.C, problem.P, problem.channels_last, plan.width, plan.sm_count);
    elems = std::max(elems, partial_elems(pass, n, problem.C, 2));
  }
  return elems;
}

// ---- device properties, queried once per device -------------------------------------

struct DeviceInfo {
  int sm_count;
  int64_t l2_bytes;
};
DeviceInfo current_device_info();  // se_forward.cu

// Samples per L2-resident group: a group's bytes read by the first pass should still be in
// L2 when the second pass reads them again. SE_KERNELS_CUDA_GROUP_BYTES overrides the
// budget (for tuning and tests; 0 disables grouping).
int64_t group_size(int64_t N, int64_t bytes_per_sample);  // se_forward.cu

// Vector width for tensors whose row length (P for NCHW, C for channels-last) is `row`
// and whose base pointers are `ptrs`: 16-byte accesses when every row starts 16-aligned.
template <typename T>
int pass_width(int64_t row, std::initializer_list<const void*> ptrs) {
  constexpr int w = vector_width<T>();
  if (row % w != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return w;
}

// ---- launching ----------------------------------------------------------------------

#ifndef SE_KERNELS_CUDA_EMULATION
// The CPU emulation in tests/cuda_emulator replaces these: it gives every CTA its own shared
// memory, leaves NaN gaps between the buffers of a workspace, and runs launches as host code.
#define SE_SHARED(T, name, dims) __shared__ T name dims
constexpr int64_t kWorkspaceGap = 0;
inline void workspace_region(const char*, const void*, int64_t) {}
#endif

// kernel<<<ctas, threads, 0, stream>>>(args...), then the launch check. Every launch goes
// through here, on the GPU and on the emulator.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t ctas, int threads, cudaStream_t stream,
            const Args&... args) {
  TORCH_INTERNAL_ASSERT(ctas > 0 && ctas <= INT_MAX && threads > 0 && threads <= kThreads);
#ifdef SE_KERNELS_CUDA_EMULATION
  (void)stream;
  emulated_launch(kernel, ctas, threads, args...);
#else
  kernel<<<static_cast<unsigned>(ctas), threads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// ---- the streaming kernels ----------------------------------------------------------

// Visits off = start, start + stride, ... < end, loading a whole batch before using it so
// that kBatch independent loads are in flight per thread.
template <typename Load, typename Use>
__device__ __forceinline__ void walk(int64_t start, int64_t end, int64_t stride, const Load& load,
                                     const Use& use) {
  using Loaded = decltype(load(start));
  int64_t off = start;
  for (; off + (kBatch - 1) * stride < end; off += kBatch * stride) {
    Loaded e[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) e[b] = load(off + b * stride);
#pragma unroll
    for (int b = 0; b < kBatch; ++b) use(off + b * stride, e[b]);
  }
  for (; off < end; off += stride) use(off, load(off));
}

// Terms (reduce) interface, with A the accumulation type and AW = 1 (NCHW: a row is one
// channel, its W lanes fold into one value) or W (channels-last: one value per lane):
//   static constexpr int kQ, kChan;   quantities reduced; per-channel inputs
//   static A init(int q); static A combine(int q, A, A);
//   template <int AW> void channel(int64_t nc, A (&cv)[kChan][AW]);
//   template <int W> Loaded<W> load(int64_t off);
//   template <int W, int AW> void fold(A (&acc)[kQ][AW], const Loaded<W>&, const A (&cv)[kChan][AW]);
//   void finalize(int64_t nc, const A (&v)[kQ]);      // v complete for (n, c) = nc
// Op (map) interface: kChan, channel, load as above, and
//   template <int W, int AW> void store(int64_t off, const Loaded<W>&, const A (&cv)[kChan][AW]);

template <typename Terms, int W>
__global__ void __launch_bounds__(kThreads)
    reduce_nchw_kernel(Terms terms, PassPlan plan, int64_t rows, int64_t P,
                       typename Terms::A* partial) {
  using A = typename Terms::A;
  constexpr int kQ = Terms::kQ;
  const int lanes = plan.lanes;
  const int64_t block = blockIdx.x;
  const int64_t piece = block / plan.row_blocks;
  const int64_t row = (block % plan.row_blocks) * (kThreads / lanes) + threadIdx.x / lanes;
  const int sub = threadIdx.x % lanes;

  A acc[kQ][1];
#pragma unroll
  for (int q = 0; q < kQ; ++q) acc[q][0] = Terms::init(q);
  if (row < rows) {
    A cv[Terms::kChan][1];
    terms.template channel<1>(row, cv);
    const int64_t begin = row * P + piece * plan.piece_len;
    const int64_t end = row * P + min64(P, (piece + 1) * plan.piece_len);
    walk(begin + sub * W, end, int64_t(lanes) * W,
         [&](int64_t off) { return terms.template load<W>(off); },
         [&](int64_t, const auto& e) { terms.template fold<W, 1>(acc, e, cv); });
  }
  // Every lane of the warp takes part in the shuffles, rows past the end with init values.
#pragma unroll
  for (int q = 0; q < kQ; ++q)
    for (int offset = lanes / 2; offset > 0; offset /= 2)
      acc[q][0] = Terms::combine(q, acc[q][0], __shfl_xor_sync(0xffffffffu, acc[q][0], offset));
  if (row < rows && sub == 0) {
    A v[kQ];
#pragma unroll
    for (int q = 0; q < kQ; ++q) v[q] = acc[q][0];
    if (partial == nullptr) {
      terms.finalize(row, v);
    } else {
#pragma unroll
      for (int q = 0; q < kQ; ++q) partial[(q * int64_t(plan.pieces) + piece) * rows + row] = v[q];
    }
  }
}

template <typename Terms, int W>
__global__ void __launch_bounds__(kThreads)
    reduce_cl_kernel(Terms terms, PassPlan plan, int64_t n_samples, int64_t C, int64_t P,
                     typename Terms::A* partial) {
  using A = typename Terms::A;
  constexpr int kQ = Terms::kQ;
  const int64_t block = blockIdx.x;
  const int64_t piece = block % plan.pieces;
  const int64_t cb = (block / plan.pieces) % plan.cblocks;
  const int64_t n = block / plan.pieces / plan.cblocks;
  const int tc = threadIdx.x % plan.tc, tp = threadIdx.x / plan.tc;
  const int64_t c = (cb * plan.tc + tc) * W;
  const bool valid = tp < plan.tp && c < C;

  A acc[kQ][W];
#pragma unroll
  for (int q = 0; q < kQ; ++q)
#pragma unroll
    for (int i = 0; i < W; ++i) acc[q][i] = Terms::init(q);
  if (valid) {
    A cv[Terms::kChan][W];
    terms.template channel<W>(n * C + c, cv);
    const int64_t p0 = piece * plan.piece_len;
    const int64_t p1 = min64(P, p0 + plan.piece_len);
    // Offsets below (n * P + p1) * C belong to pixels before p1, as 0 <= c < C.
    walk(((n * P) + p0 + tp) * C + c, (n * P + p1) * C, int64_t(plan.tp) * C,
         [&](int64_t off) { return terms.template load<W>(off); },
         [&](int64_t, const auto& e) { terms.template fold<W, W>(acc, e, cv); });
  }
  // Combine the tp pixel lanes of each (quantity, channel) in lane order, the sums spread
  // over the CTA's threads; each leaves its result in its lane-0 slot. Layout
  // [q][i][thread]: threads of a warp touch consecutive words.
  SE_SHARED(A, red, [kQ * W * kThreads]);
#pragma unroll
  for (int q = 0; q < kQ; ++q)
#pragma unroll
    for (int i = 0; i < W; ++i) red[(q * W + i) * kThreads + threadIdx.x] = acc[q][i];
  __syncthreads();
  if (plan.tp > 1) {
    for (int o = threadIdx.x; o < kQ * W * plan.tc; o += blockDim.x) {
      const int qi = o / plan.tc, lane = o % plan.tc;
      const int q = qi / W;
      A* vals = red + qi * kThreads + lane;
      A v = vals[0];
      for (int j = 1; j < plan.tp; ++j) v = Terms::combine(q, v, vals[j * plan.tc]);
      vals[0] = v;  // only this thread reads column `lane` of row qi
    }
    __syncthreads();
  }
  if (valid && tp == 0) {
    const int64_t count = n_samples * C;
#pragma unroll
    for (int i = 0; i < W; ++i) {
      A v[kQ];
#pragma unroll
      for (int q = 0; q < kQ; ++q) v[q] = red[(q * W + i) * kThreads + tc];
      const int64_t nc = n * C + c + i;
      if (partial == nullptr) {
        terms.finalize(nc, v);
      } else {
#pragma unroll
        for (int q = 0; q < kQ; ++q) partial[(q * int64_t(plan.pieces) + piece) * count + nc] = v[q];
      }
    }
  }
}

// Combines a split reduce pass's partials in piece order and finalizes each (n, c).
template <typename Terms>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(Terms terms, const typename Terms::A* partial, int pieces, int64_t count) {
  using A = typename Terms::A;
  constexpr int kQ = Terms::kQ;
  const int64_t nc = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (nc >= count) return;
  A v[kQ];
#pragma unroll
  for (int q = 0; q < kQ; ++q) {
    const A* part = partial + q * int64_t(pieces) * count + nc;
    v[q] = part[0];
    for (int k = 1; k < pieces; ++k) v[q] = Terms::combine(q, v[q], part[k * count]);
  }
  terms.finalize(nc, v);
}

template <typename Op, int W>
__global__ void __launch_bounds__(kThreads)
    map_nchw_kernel(Op op, PassPlan plan, int64_t rows, int64_t P) {
  using A = typename Op::A;
  const int lanes = plan.lanes;
  const int64_t block = blockIdx.x;
  const int64_t piece = block / plan.row_blocks;
  const int64_t row = (block % plan.row_blocks) * (kThreads / lanes) + threadIdx.x / lanes;
  const int sub = threadIdx.x % lanes;
  if (row >= rows) return;
  A cv[Op::kChan][1];
  op.template channel<1>(row, cv);
  const int64_t begin = row * P + piece * plan.piece_len;
  const int64_t end = row * P + min64(P, (piece + 1) * plan.piece_len);
  walk(begin + sub * W, end, int64_t(lanes) * W,
       [&](int64_t off) { return op.template load<W>(off); },
       [&](int64_t off, const auto& e) { op.template store<W, 1>(off, e, cv); });
}

template <typename Op, int W>
__global__ void __launch_bounds__(kThreads)
    map_cl_kernel(Op op, PassPlan plan, int64_t C, int64_t P) {
  using A = typename Op::A;
  const int64_t block = blockIdx.x;
  const int64_t piece = block % plan.pieces;
  const int64_t cb = (block / plan.pieces) % plan.cblocks;
  const int64_t n = block / plan.pieces / plan.cblocks;
  const int tc = threadIdx.x % plan.tc, tp = threadIdx.x / plan.tc;
  const int64_t c = (cb * plan.tc + tc) * W;
  if (tp >= plan.tp || c >= C) return;
  A cv[Op::kChan][W];
  op.template channel<W>(n * C + c, cv);
  const int64_t p0 = piece * plan.piece_len;
  const int64_t p1 = min64(P, p0 + plan.piece_len);
  walk(((n * P) + p0 + tp) * C + c, (n * P + p1) * C, int64_t(plan.tp) * C,
       [&](int64_t off) { return op.template load<W>(off); },
       [&](int64_t off, const auto& e) { op.template store<W, W>(off, e, cv); });
}

// Host side: run a reduce pass over n samples (partials when the plan splits rows, then
// the combine kernel), or a map pass.
template <typename T, typename Terms>
void run_reduce(const Terms& terms, const PassPlan& plan, int64_t n, int64_t C, int64_t P,
                typename Terms::A* partial, cudaStream_t stream) {
  constexpr int kW = vector_width<T>();
  typename Terms::A* out = plan.pieces > 1 ? partial : nullptr;
  const bool vec = plan.width == kW;
  if (!plan.channels_last)
    launch(vec ? reduce_nchw_kernel<Terms, kW> : reduce_nchw_kernel<Terms, 1>, plan.ctas,
           plan.threads, stream, terms, plan, n * C, P, out);
  else
    launch(vec ? reduce_cl_kernel<Terms, kW> : reduce_cl_kernel<Terms, 1>, plan.ctas,
           plan.threads, stream, terms, plan, n, C, P, out);
  if (plan.pieces > 1) {
    const int64_t count = n * C;
    launch(combine_kernel<Terms>, ceil_div(count, kThreads), kThreads, stream, terms, partial,
           plan.pieces, count);
  }
}

template <typename T, typename Op>
void run_map(const Op& op, const PassPlan& plan, int64_t n, int64_t C, int64_t P,
             cudaStream_t stream) {
  constexpr int kW = vector_width<T>();
  const bool vec = plan.width == kW;
  if (!plan.channels_last)
    launch(vec ? map_nchw_kernel<Op, kW> : map_nchw_kernel<Op, 1>, plan.ctas, plan.threads,
           stream, op, plan, n * C, P);
  else
    launch(vec ? map_cl_kernel<Op, kW> : map_cl_kernel<Op, 1>, plan.ctas, plan.threads, stream,
           op, plan, C, P);
}

// Calls fn(tag) with the CUDA type of `dtype`.
template <typename F>
void dispatch_dtype(DType dtype, F&& fn) {
  switch (dtype) {
    case DType::Half: fn(__half{}); break;
    case DType::BFloat16: fn(__nv_bfloat16{}); break;
    case DType::Float: fn(float{}); break;
    case DType::Double: fn(double{}); break;
  }
}

inline int64_t element_size(DType dtype) {
  switch (dtype) {
    case DType::Half:
    case DType::BFloat16: return 2;
    case DType::Float: return 4;
    case DType::Double: return 8;
  }
  return 0;
}

}  // namespace detail
}  // namespace se_kernels::cuda
