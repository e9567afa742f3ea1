// Device helpers, the streaming tiles and MLP items shared by se_forward.cu and
// se_backward.cu, and the pipeline kernel that runs them as ticketed work items.
//
// Both directions make two passes over x-sized tensors with an O(N*C*S) MLP between them:
//   reduce pass: per (n, c), fold Terms over the spatial positions (pool; sum dy*x)
//   map pass:    per element, an Op of the element and per-channel values (scale; dx)
// A tile (one CTA's share of a pass, see PassPlan in se_plan.h) walks x in its layout:
//   NCHW:          a row (n, c) holds P contiguous elements. A group of `lanes` threads of
//                  one warp (a power of two, sized to the row) walks one row; rows are
//                  consecutive, so a warp reads one contiguous span. A row's ends that
//                  are not 16-byte aligned (P, or the elements before the row, not a
//                  multiple of the width) are peeled; alignment is that of the offset in
//                  the whole tensor, as a sample group may start off a 16-byte boundary.
//   channels-last: a pixel (n, p) holds C contiguous channels. A CTA has tc x tp threads:
//                  tc threads cover a block of channels, each `width` wide, and tp of them
//                  walk interleaved pixels; per-channel values stay in registers.
// Rows (NCHW) or pixels (channels-last) are split into `pieces` when the batch alone gives
// too few tiles; reduce tiles then write per-piece partials that are combined in piece
// order. Every reduction has a fixed order that depends only on the shapes: results are
// bitwise reproducible, and no atomics touch the arithmetic.
//
// Values one kernel writes and another CTA of the same kernel reads (partials, z, s, ...)
// are read with ld.global.cg (L2, not the incoherent L1 or the non-coherent cache).
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

constexpr int kBatch = 4;  // loads a thread issues before using any of them

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Samples of an MLP item's tile that exist: kTile, fewer at the end of the batch, or none.
__device__ __forceinline__ int tile_samples(int64_t N, int64_t n0) {
  const int64_t left = N - n0;
  return left <= 0 ? 0 : left < kTile ? static_cast<int>(left) : kTile;
}

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

// ---- the activations and gates, and their derivatives (DESIGN.md §1.3) ---------------

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }

template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {  // torch.amax propagates NaN
  return (a > b || isnan(a)) ? a : b;
}
template <typename A>
__device__ __forceinline__ A sigmoid_(A v) { return A(1) / (A(1) + exp_(-v)); }
// The option math of DESIGN.md §1.3: one switch per function, a case per value and no
// default (se_options.h; the emulator's host build has -Werror=switch).
template <typename A>
__device__ __forceinline__ A activation(A a, Activation kind) {
  switch (kind) {
    case Activation::ReLU: return a < A(0) ? A(0) : a;  // relu keeps NaN, as torch's
    case Activation::SiLU: return a / (A(1) + exp_(-a));
  }
  return a;  // not reached
}
// d activation(a) / da applied to the incoming gradient dh.
template <typename A>
__device__ __forceinline__ A activation_backward(A a, A dh, Activation kind) {
  switch (kind) {
    case Activation::ReLU: return a > A(0) ? dh : A(0);
    case Activation::SiLU: {
      const A sig = sigmoid_(a);
      return dh * sig * (A(1) + a * (A(1) - sig));
    }
  }
  return dh;  // not reached
}
template <typename A>
__device__ __forceinline__ A gate(A g, Gate kind) {
  switch (kind) {
    case Gate::Sigmoid: return sigmoid_(g);
    case Gate::HardSigmoid: {
      A t = g + A(3);  // comparisons rather than fmin/fmax so NaN stays NaN, as in torch
      t = t < A(0) ? A(0) : t;
      t = t > A(6) ? A(6) : t;
      return t / A(6);
    }
  }
  return g;  // not reached
}
// d gate(g) / dg applied to ds, given s = gate(g). Hardsigmoid uses torch's open interval.
template <typename A>
__device__ __forceinline__ A gate_backward(A g, A s, A ds, Gate kind) {
  switch (kind) {
    case Gate::Sigmoid: return ds * s * (A(1) - s);
    case Gate::HardSigmoid: return (g > A(-3) && g < A(3)) ? ds / A(6) : A(0);
  }
  return ds;  // not reached
}

// ---- device properties, queried once per device -------------------------------------

DeviceInfo current_device_info();  // se_forward.cu

// Vector width for tensors whose base pointers are `ptrs` and whose contiguous row is `row`
// long: 16-byte accesses when every pointer is 16-aligned (the tensors share one layout, so
// an element's offset from a 16-byte boundary is then the same in all of them) and, for
// channels-last (`row` = C), the row is a whole number of vectors; NCHW rows peel their
// unaligned ends, wherever in the tensor the row starts (walk_row).
template <typename T>
int pass_width(int64_t row, bool channels_last, std::initializer_list<const void*> ptrs) {
  constexpr int w = vector_width<T>();
  if (channels_last && row % w != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return w;
}

// ---- launching ----------------------------------------------------------------------

#ifndef SE_KERNELS_CUDA_EMULATION
// The CPU emulation in tests/cuda_emulator replaces these: it gives every CTA its own shared
// memory, leaves NaN gaps between the buffers of a workspace, and runs launches as host code.
#define SE_SHARED(T, name, dims) __shared__ T name dims
inline void workspace_region(const char*, const void*, int64_t) {}

// The value of a sync counter, ordered before this thread's later loads (acquire, GPU scope).
__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void spin_pause() { __nanosleep(64); }
#endif

// kernel<<<ctas, threads, 0, stream>>>(args...), then the launch check. Every launch goes
// through here, on the GPU and on the emulator, which records `what` (the kernel's code in
// the trace of se_plan.h) so tests can check launches against the plan.
template <typename... Params, typename... Args>
void launch(TraceKernel what, void (*kernel)(Params...), int64_t ctas, int threads,
            cudaStream_t stream, const Args&... args) {
  TORCH_INTERNAL_ASSERT(ctas > 0 && ctas <= INT_MAX && threads > 0 && threads <= kThreads);
#ifdef SE_KERNELS_CUDA_EMULATION
  (void)stream;
  emulated_launch(what, kernel, ctas, threads, args...);
#else
  (void)what;
  kernel<<<static_cast<unsigned>(ctas), threads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// ---- the streaming tiles --------------------------------------------------------------

// Loads a thread keeps in flight while walking a pass: kBatch, or fewer when a loaded
// element is large (the backward's map reads up to three tensors and keeps four
// per-channel values per lane), so that the pass fits 128 registers without spilling.
template <typename Loaded>
constexpr int walk_batch() { return sizeof(Loaded) > 32 ? kBatch / 2 : kBatch; }

// Visits off = start, start + stride, ... < end, loading a whole batch before using it so
// that several independent loads are in flight per thread.
template <typename Load, typename Use>
__device__ __forceinline__ void walk(int64_t start, int64_t end, int64_t stride, const Load& load,
                                     const Use& use) {
  using Loaded = decltype(load(start));
  constexpr int kB = walk_batch<Loaded>();
  int64_t off = start;
  for (; off + (kB - 1) * stride < end; off += kB * stride) {
    Loaded e[kB];
#pragma unroll
    for (int b = 0; b < kB; ++b) e[b] = load(off + b * stride);
#pragma unroll
    for (int b = 0; b < kB; ++b) use(off + b * stride, e[b]);
  }
  for (; off < end; off += stride) use(off, load(off));
}

// Visits elements [begin, end) of one NCHW row with `lanes` threads (this one is `sub`):
// W-wide accesses over the 16-byte-aligned body, single elements around it. Offsets are
// relative to a sample group that starts `phase` elements (mod W) past a 16-byte boundary
// (tile_phase), so the body begins at the first offset with (phase + off) % W == 0: a group
// need not start on a boundary, as n0 * C * P is a multiple of W only for some shapes.
// visit(Width<V>, off) handles V elements at off.
template <int V>
struct Width {
  static constexpr int kWidth = V;
};
template <int W, typename Visit>
__device__ __forceinline__ void walk_row(int64_t begin, int64_t end, int phase, int lanes,
                                         int sub, const Visit& visit) {
  int64_t body = begin, body_end = end;
  if constexpr (W > 1) {
    body = min64(end, begin + (W - (begin + phase) % W) % W);
    body_end = body + (end - body) / W * W;
    for (int64_t off = begin + sub; off < body; off += lanes) visit(Width<1>{}, off);
    for (int64_t off = body_end + sub; off < end; off += lanes) visit(Width<1>{}, off);
  }
  visit(Width<W>{}, body + int64_t(sub) * W, body_end, int64_t(lanes) * W);
}

// Terms (reduce) interface, with A the accumulation type and AW = 1 (NCHW: a row is one
// channel, its lanes fold into one value) or W (channels-last: one value per lane):
//   static constexpr int kQ, kChan;   quantities reduced; per-channel inputs
//   static A init(int q); static A combine(int q, A, A);
//   template <int AW> void channel(int64_t nc, A (&cv)[kChan][AW]);
//   template <int W> Loaded<W> load(int64_t off);
//   template <int W, int AW> void fold(int64_t off, A (&acc)[kQ][AW], const Loaded<W>&,
//                                      const A (&cv)[kChan][AW]);
//   void finalize(int64_t nc, const A (&v)[kQ]);      // v complete for (n, c) = nc
// Op (map) interface: kChan, channel, load as above, and
//   template <int W, int AW> void store(int64_t off, const Loaded<W>&, const A (&cv)[kChan][AW]);
// Offsets are relative to the tile's sample group, as are the Terms' and Op's pointers.

// Where the group of samples from n0 starts relative to a 16-byte boundary, in elements mod W,
// for tensors whose bases are 16-byte aligned (pass_width's condition for W > 1). The NCHW
// walk aligns its vectors with it; channels-last needs none, as W divides C there.
template <int W>
__device__ __forceinline__ int tile_phase(int64_t n0, int64_t C, int64_t P) {
  return static_cast<int>(n0 * C * P % W);
}

// One reduce tile of an NCHW pass over `rows` rows: writes the tile's partial per row, or
// finalizes rows directly when `partial` is nullptr (an unsplit pass).
template <typename Terms, int W>
__device__ __forceinline__ void reduce_nchw_tile(const Terms& terms, const PassPlan& plan,
                                                 int64_t rows, int64_t P, int phase,
                                                 typename Terms::A* partial, int64_t block) {
  using A = typename Terms::A;
  constexpr int kQ = Terms::kQ;
  const int lanes = plan.lanes;
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
    walk_row<W>(begin, end, phase, lanes, sub, [&](auto width, int64_t start, auto... range) {
      constexpr int V = decltype(width)::kWidth;
      auto load = [&](int64_t off) { return terms.template load<V>(off); };
      auto fold = [&](int64_t off, const auto& e) { terms.template fold<V, 1>(off, acc, e, cv); };
      if constexpr (sizeof...(range) == 0) fold(start, load(start));
      else walk(start, range..., load, fold);
    });
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

// One reduce tile of a channels-last pass over n_samples samples (see reduce_nchw_tile).
template <typename Terms, int W>
__device__ __forceinline__ void reduce_cl_tile(const Terms& terms, const PassPlan& plan,
                                               int64_t n_samples, int64_t C, int64_t P,
                                               typename Terms::A* partial, int64_t block) {
  using A = typename Terms::A;
  constexpr int kQ = Terms::kQ;
  const int64_t piece = block % plan.pieces;
  const int64_t cb = (block / plan.pieces) % plan.cblocks;
  const int64_t n = block / plan.pieces / plan.cblocks;
  const int tc = threadIdx.x % plan.tc, tp = threadIdx.x / plan.tc;
  const int64_t c = (cb * plan.tc + tc) * W;
  const bool valid = tp < plan.tp && c < C && n < n_samples;

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
         [&](int64_t off, const auto& e) { terms.template fold<W, W>(off, acc, e, cv); });
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
        for (int q = 0; q < kQ; ++q)
          partial[(q * int64_t(plan.pieces) + piece) * count + nc] = v[q];
      }
    }
  }
  __syncthreads();  // `red` is reused by the CTA's next tile
}

// Combines the partials of (n, c) = nc over the pieces, in piece order, and finalizes it.
// Loads go out kBatch pieces at a time: a combine of many pieces runs on one CTA in the
// pipelined schedule, so it must not pay an L2 round trip per piece.
template <typename Terms>
__device__ __forceinline__ void combine_one(const Terms& terms, const typename Terms::A* partial,
                                            int pieces, int64_t count, int64_t nc) {
  using A = typename Terms::A;
  constexpr int kQ = Terms::kQ;
  A v[kQ];
#pragma unroll
  for (int q = 0; q < kQ; ++q) v[q] = ld_fresh(partial + q * int64_t(pieces) * count + nc);
  for (int k0 = 1; k0 < pieces; k0 += kBatch) {
    A e[kQ][kBatch];
#pragma unroll
    for (int q = 0; q < kQ; ++q)
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
        if (k0 + b < pieces)
          e[q][b] = ld_fresh(partial + (q * int64_t(pieces) + k0 + b) * count + nc);
#pragma unroll
    for (int q = 0; q < kQ; ++q)
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
        if (k0 + b < pieces) v[q] = Terms::combine(q, v[q], e[q][b]);
  }
  terms.finalize(nc, v);
}

// One map tile of an NCHW pass.
template <typename Op, int W>
__device__ __forceinline__ void map_nchw_tile(const Op& op, const PassPlan& plan, int64_t rows,
                                              int64_t P, int phase, int64_t block) {
  using A = typename Op::A;
  const int lanes = plan.lanes;
  const int64_t piece = block / plan.row_blocks;
  const int64_t row = (block % plan.row_blocks) * (kThreads / lanes) + threadIdx.x / lanes;
  const int sub = threadIdx.x % lanes;
  if (row >= rows) return;
  A cv[Op::kChan][1];
  op.template channel<1>(row, cv);
  const int64_t begin = row * P + piece * plan.piece_len;
  const int64_t end = row * P + min64(P, (piece + 1) * plan.piece_len);
  walk_row<W>(begin, end, phase, lanes, sub, [&](auto width, int64_t start, auto... range) {
    constexpr int V = decltype(width)::kWidth;
    auto load = [&](int64_t off) { return op.template load<V>(off); };
    auto store = [&](int64_t off, const auto& e) { op.template store<V, 1>(off, e, cv); };
    if constexpr (sizeof...(range) == 0) store(start, load(start));
    else walk(start, range..., load, store);
  });
}

// One map tile of a channels-last pass over n_samples samples.
template <typename Op, int W>
__device__ __forceinline__ void map_cl_tile(const Op& op, const PassPlan& plan, int64_t n_samples,
                                            int64_t C, int64_t P, int64_t block) {
  using A = typename Op::A;
  const int64_t piece = block % plan.pieces;
  const int64_t cb = (block / plan.pieces) % plan.cblocks;
  const int64_t n = block / plan.pieces / plan.cblocks;
  const int tc = threadIdx.x % plan.tc, tp = threadIdx.x / plan.tc;
  const int64_t c = (cb * plan.tc + tc) * W;
  if (tp >= plan.tp || c >= C || n >= n_samples) return;
  A cv[Op::kChan][W];
  op.template channel<W>(n * C + c, cv);
  const int64_t p0 = piece * plan.piece_len;
  const int64_t p1 = min64(P, p0 + plan.piece_len);
  walk(((n * P) + p0 + tp) * C + c, (n * P + p1) * C, int64_t(plan.tp) * C,
       [&](int64_t off) { return op.template load<W>(off); },
       [&](int64_t off, const auto& e) { op.template store<W, W>(off, e, cv); });
}

// The tile `block` of a pass over the n samples from sample n0, in the plan's layout and
// width; the Terms' or Op's pointers start at sample n0.
template <typename T, typename Terms>
__device__ __forceinline__ void reduce_tile(const Terms& terms, const PassPlan& plan, int64_t n0,
                                            int64_t n, int64_t C, int64_t P,
                                            typename Terms::A* partial, int64_t block) {
  constexpr int kW = vector_width<T>();
  if (!plan.channels_last) {
    const int phase = tile_phase<kW>(n0, C, P);
    if (plan.width == kW) reduce_nchw_tile<Terms, kW>(terms, plan, n * C, P, phase, partial, block);
    else reduce_nchw_tile<Terms, 1>(terms, plan, n * C, P, 0, partial, block);
  } else {
    if (plan.width == kW) reduce_cl_tile<Terms, kW>(terms, plan, n, C, P, partial, block);
    else reduce_cl_tile<Terms, 1>(terms, plan, n, C, P, partial, block);
  }
}
template <typename T, typename Op>
__device__ __forceinline__ void map_tile(const Op& op, const PassPlan& plan, int64_t n0,
                                         int64_t n, int64_t C, int64_t P, int64_t block) {
  constexpr int kW = vector_width<T>();
  if (!plan.channels_last) {
    const int phase = tile_phase<kW>(n0, C, P);
    if (plan.width == kW) map_nchw_tile<Op, kW>(op, plan, n * C, P, phase, block);
    else map_nchw_tile<Op, 1>(op, plan, n * C, P, 0, block);
  } else {
    if (plan.width == kW) map_cl_tile<Op, kW>(op, plan, n, C, P, block);
    else map_cl_tile<Op, 1>(op, plan, n, C, P, block);
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
#pragma unroll
  for (int t = 0; t < kTile; ++t) acc[t] = A(0);
  if (r < R) {
    const T* w = weight + r * K;
    const A* inp = in + n0 * K;
    for (int64_t k = sub; k < K; k += lanes) {
      const A wv = to_acc(w[k]);
#pragma unroll
      for (int t = 0; t < kTile; ++t)
        if (t < nt) acc[t] += wv * ld_fresh(inp + t * K + k);
    }
  }
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
#pragma unroll
  for (int t = 0; t < kTile; ++t) acc[t] = A(0);
  if (col < cols) {
    const A* inp = in + n0 * K;
    for (int64_t k = warp; k < K; k += kWarps) {
      const A wv = to_acc(weight[k * cols + col]);
#pragma unroll
      for (int t = 0; t < kTile; ++t)
        if (t < nt) acc[t] += ld_fresh(inp + t * K + k) * wv;
    }
  }
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

// ---- the grouped schedule: one kernel per stage and group --------------------------------

template <typename T, typename Terms>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
    reduce_kernel(Terms terms, PassPlan plan, int64_t n0, int64_t n, int64_t C, int64_t P,
                  typename Terms::A* partial) {
  reduce_tile<T>(terms, plan, n0, n, C, P, partial, blockIdx.x);
}

template <typename Terms>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(Terms terms, const typename Terms::A* partial, int pieces, int64_t count) {
  const int64_t nc = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (nc < count) combine_one(terms, partial, pieces, count, nc);
}

template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
    map_kernel(Op op, PassPlan plan, int64_t n0, int64_t n, int64_t C, int64_t P) {
  map_tile<T>(op, plan, n0, n, C, P, blockIdx.x);
}

template <typename T, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
    rows_dot_kernel(const T* weight, const acc_t<T>* in, int64_t N, int64_t R, int64_t K,
                    MlpTiling tiling, Epilogue epilogue) {
  rows_dot_item(weight, in, N, R, K, tiling, epilogue, blockIdx.x);
}

template <typename T, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
    cols_dot_kernel(const T* weight, const acc_t<T>* in, int64_t N, int64_t K, int64_t cols,
                    MlpTiling tiling, Epilogue epilogue) {
  cols_dot_item(weight, in, N, K, cols, tiling, epilogue, blockIdx.x);
}

// A reduce pass over the n samples from n0 (the Terms' pointers start there): partials when
// the plan splits rows, then the combine kernel.
template <typename T, typename Terms>
void run_reduce(const Terms& terms, const PassPlan& plan, int64_t n0, int64_t n, int64_t C,
                int64_t P, typename Terms::A* partial, cudaStream_t stream) {
  typename Terms::A* out = plan.pieces > 1 ? partial : nullptr;
  launch(TraceKernel::Reduce, reduce_kernel<T, Terms>, plan.ctas, plan.threads, stream, terms,
         plan, n0, n, C, P, out);
  if (plan.pieces > 1) {
    const int64_t count = n * C;
    launch(TraceKernel::Combine, combine_kernel<Terms>, ceil_div(count, kThreads), kThreads,
           stream, terms, partial, plan.pieces, count);
  }
}

template <typename T, typename Op>
void run_map(const Op& op, const PassPlan& plan, int64_t n0, int64_t n, int64_t C, int64_t P,
             cudaStream_t stream) {
  launch(TraceKernel::Map, map_kernel<T, Op>, plan.ctas, plan.threads, stream, op, plan, n0, n,
         C, P);
}

// ---- the pipelined schedule: every stage of every group in one kernel ---------------------

// Sync counters of a pipelined call (zeroed by zero_kernel): the next ticket, then per
// group the reduce tiles done (+1 once combined), and the items of each MLP stage done.
struct Counters {
  unsigned* base;
  int64_t groups;
  __device__ unsigned* ticket() const { return base; }
  __device__ unsigned* reduced(int64_t g) const { return base + 1 + g; }
  __device__ unsigned* mlp1(int64_t g) const { return base + 1 + groups + g; }
  __device__ unsigned* mlp2(int64_t g) const { return base + 1 + 2 * groups + g; }
};

template <typename U>  // a template, so each .cu file may define it
__global__ void __launch_bounds__(kThreads) zero_kernel(U* p, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) p[i] = U(0);
}

// After the CTA's writes: counts one more item done at *counter (release); returns, to every
// thread, the count before (so the CTA that finished the last item knows it, and then also
// sees every other CTA's writes, as the fence after the atomic orders its later loads).
__device__ __forceinline__ unsigned publish(unsigned* counter) {
  SE_SHARED(unsigned, before, [1]);
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    before[0] = atomicAdd(counter, 1u);
    __threadfence();
  }
  __syncthreads();
  const unsigned b = before[0];
  __syncthreads();
  return b;
}

// Waits until *counter reaches `target`. The items counted there hold smaller tickets than
// this CTA's, so CTAs that started before this one hold them, and they wait on nothing
// later: no CTA needs another to be scheduled to finish.
__device__ __forceinline__ void wait_until(const unsigned* counter, unsigned target) {
  if (threadIdx.x == 0)
    while (load_acquire(counter) < target) spin_pause();
  __syncthreads();
}

// The next ticket, to every thread of the CTA.
__device__ __forceinline__ int64_t take_ticket(const Counters& sync) {
  SE_SHARED(unsigned, ticket, [1]);
  if (threadIdx.x == 0) {
    __threadfence();
    ticket[0] = atomicAdd(sync.ticket(), 1u);
  }
  __syncthreads();
  const int64_t t = ticket[0];
  __syncthreads();
  return t;
}

// Stages interface (per direction), each relative to the samples [n0, n0 + n) of a group g:
//   void reduce(int64_t tile, int64_t g, int64_t n0, int64_t n);    partials of the group, or
//                                                       (unsplit rows) its finished (n, c)
//   void combine(int64_t g, int64_t n0, int64_t n);    every (n, c) of it, from the partials
//   void mlp1(int64_t item, int64_t n0, int64_t n); void mlp2(...);
//   void map(int64_t tile, int64_t n0, int64_t n);
// Tickets are taken in order; ticket t is item t % step_items of step t / step_items
// (Pipeline::stage_begin), which belongs to group step - stage_lag(stage).
// kCtasPerSm (Pipeline::ctas_per_sm, 1 or 2) bounds the registers a thread may use: 128
// with 2, where the backward's stages spill to local memory; 255 with 1, where they spill
// little or nothing but an SM holds half the warps. Both variants are built so that a GPU
// run can tell which costs less (DESIGN.md §3.1).
template <typename Stages, int kCtasPerSm>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    pipeline_kernel(Stages stages, Pipeline p, int64_t N, unsigned* counters) {
  const Counters sync{counters, p.groups};
  const int64_t tickets = p.steps * p.step_items;
  for (int64_t ticket = take_ticket(sync); ticket < tickets; ticket = take_ticket(sync)) {
    const int64_t step = ticket / p.step_items, r = ticket % p.step_items;
    int stage = kMap;
    while (stage > kReduce && r < p.stage_begin(stage)) --stage;
    const int64_t item = r - p.stage_begin(stage);
    const int64_t g = step - p.stage_lag(stage);
    if (g < 0 || g >= p.groups) continue;
    const int64_t n0 = g * p.group, n = min64(p.group, N - n0);
    switch (stage) {
      case kReduce:
        stages.reduce(item, g, n0, n);
        if (publish(sync.reduced(g)) == p.pass.ctas - 1) {
          if (p.pass.pieces > 1) stages.combine(g, n0, n);
          publish(sync.reduced(g));
        }
        break;
      case kMlp1:
        wait_until(sync.reduced(g), static_cast<unsigned>(p.pass.ctas + 1));
        stages.mlp1(item, n0, n);
        publish(sync.mlp1(g));
        break;
      case kMlp2:
        wait_until(sync.mlp1(g), static_cast<unsigned>(p.mlp1.items));
        stages.mlp2(item, n0, n);
        publish(sync.mlp2(g));
        break;
      default:
        wait_until(sync.mlp2(g), static_cast<unsigned>(p.mlp2.items));
        stages.map(item, n0, n);
        break;
    }
  }
}

// A pipelined call: `stages` (its pointers set) take the pipeline's tiling; the sync
// counters live at `counters` in the workspace.
template <typename Stages>
void run_pipeline(TraceKernel what, Stages stages, const Pipeline& p, int64_t N, void* counters,
                  cudaStream_t stream) {
  stages.group = p.group;
  stages.pass = p.pass;
  stages.tiling1 = p.mlp1;
  stages.tiling2 = p.mlp2;
  auto* sync = static_cast<unsigned*>(counters);
  workspace_region("counters", sync, p.counters * sizeof(unsigned));
  launch(TraceKernel::ZeroSync, zero_kernel<unsigned>, ceil_div(p.counters, kThreads), kThreads,
         stream, sync, p.counters);
  TORCH_INTERNAL_ASSERT(p.ctas_per_sm == 1 || p.ctas_per_sm == 2);
  if (p.ctas_per_sm == 1)
    launch(what, pipeline_kernel<Stages, 1>, p.ctas, kThreads, stream, stages, p, N, sync);
  else
    launch(what, pipeline_kernel<Stages, 2>, p.ctas, kThreads, stream, stages, p, N, sync);
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

}  // namespace detail
}  // namespace se_kernels::cuda
