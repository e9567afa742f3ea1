// The streaming tiles of the two passes, shared by se_forward.cu, se_backward.cu and the
// stream ops' se_stream.cu, and the element bodies several of their passes share.
//
// Both directions make two passes over x-sized tensors with an O(N*C*S) MLP between them:
//   reduce pass: per (n, c), fold Terms over the spatial positions (pool; sum dy*x)
//   map pass:    per element, an Op of the element and per-channel values (scale; dx)
// A tile (one CTA's share of a pass, see PassTiling in se_tiling.h) walks x in its layout:
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

#include <algorithm>
#include <cstdint>

#include "se_cuda_launch.cuh"

namespace se_kernels::cuda {
namespace detail {

constexpr int kBatch = 4;  // loads a thread issues before using any of them

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
// Each access of V elements at off is loaded with src.load<V>(off) and handed to
// use(Width<V>{}, off, loaded).
template <int V>
struct Width {
  static constexpr int kWidth = V;
};
template <int W, typename Src, typename Use>
__device__ __forceinline__ void walk_row(int64_t begin, int64_t end, int phase, int lanes,
                                         int sub, const Src& src, const Use& use) {
  int64_t body = begin, body_end = end;
  if constexpr (W > 1) {
    body = min64(end, begin + (W - (begin + phase) % W) % W);
    body_end = body + (end - body) / W * W;
    for (int64_t off = begin + sub; off < body; off += lanes)
      use(Width<1>{}, off, src.template load<1>(off));
    for (int64_t off = body_end + sub; off < end; off += lanes)
      use(Width<1>{}, off, src.template load<1>(off));
  }
  walk(body + int64_t(sub) * W, body_end, int64_t(lanes) * W,
       [&](int64_t off) { return src.template load<W>(off); },
       [&](int64_t off, const auto& e) { use(Width<W>{}, off, e); });
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

// A thread's share of an NCHW tile `block`: the row (n, c) its group of plan.lanes threads
// walks (past the pass's last row for spare threads of the last row block), its place `sub`
// among them, and the tile's piece [begin, end) of the row, in offsets from the sample group.
struct RowSpan {
  int64_t row, piece, begin, end;
  int sub;
};
__device__ __forceinline__ RowSpan row_span(const PassTiling& plan, int64_t P, int64_t block) {
  const int lanes = plan.lanes;
  RowSpan r;
  r.piece = block / plan.row_blocks;
  r.row = (block % plan.row_blocks) * (kThreads / lanes) + threadIdx.x / lanes;
  r.sub = threadIdx.x % lanes;
  r.begin = r.row * P + r.piece * plan.piece_len;
  r.end = r.row * P + min64(P, (r.piece + 1) * plan.piece_len);
  return r;
}

// One reduce tile of an NCHW pass over `rows` rows: writes the tile's partial per row, or
// finalizes rows directly when `partial` is nullptr (an unsplit pass).
template <typename Terms, int W>
__device__ __forceinline__ void reduce_nchw_tile(const Terms& terms, const PassTiling& plan,
                                                 int64_t rows, int64_t P, int phase,
                                                 typename Terms::A* partial, int64_t block) {
  using A = typename Terms::A;
  constexpr int kQ = Terms::kQ;
  const int lanes = plan.lanes;
  const RowSpan span = row_span(plan, P, block);

  A acc[kQ][1];
#pragma unroll
  for (int q = 0; q < kQ; ++q) acc[q][0] = Terms::init(q);
  if (span.row < rows) {
    A cv[Terms::kChan][1];
    terms.template channel<1>(span.row, cv);
    walk_row<W>(span.begin, span.end, phase, lanes, span.sub, terms,
                [&](auto width, int64_t off, const auto& e) {
                  terms.template fold<decltype(width)::kWidth, 1>(off, acc, e, cv);
                });
  }
  // Every lane of the warp takes part in the shuffles, rows past the end with init values.
#pragma unroll
  for (int q = 0; q < kQ; ++q)
    for (int offset = lanes / 2; offset > 0; offset /= 2)
      acc[q][0] = Terms::combine(q, acc[q][0], __shfl_xor_sync(0xffffffffu, acc[q][0], offset));
  if (span.row < rows && span.sub == 0) {
    A v[kQ];
#pragma unroll
    for (int q = 0; q < kQ; ++q) v[q] = acc[q][0];
    if (partial == nullptr) {
      terms.finalize(span.row, v);
    } else {
#pragma unroll
      for (int q = 0; q < kQ; ++q)
        partial[(q * int64_t(plan.pieces) + span.piece) * rows + span.row] = v[q];
    }
  }
}

// A thread's share of a channels-last tile `block` over n_samples samples: its sample n, its
// channel vector (W channels from c, the tc-th of the tile's) and pixel lane tp, `valid`
// when all three exist, and the tile's piece of the sample's pixels as the offsets the lane
// walks: from `begin` to `end`, `stride` (one pixel per lane) apart.
struct PixelSpan {
  int64_t n, piece, c, begin, end, stride;
  int tc, tp;
  bool valid;
};
template <int W>
__device__ __forceinline__ PixelSpan pixel_span(const PassTiling& plan, int64_t n_samples,
                                                int64_t C, int64_t P, int64_t block) {
  PixelSpan s;
  s.piece = block % plan.pieces;
  const int64_t cb = (block / plan.pieces) % plan.cblocks;
  s.n = block / plan.pieces / plan.cblocks;
  s.tc = threadIdx.x % plan.tc;
  s.tp = threadIdx.x / plan.tc;
  s.c = (cb * plan.tc + s.tc) * W;
  s.valid = s.tp < plan.tp && s.c < C && s.n < n_samples;
  const int64_t p0 = s.piece * plan.piece_len;
  const int64_t p1 = min64(P, p0 + plan.piece_len);
  // Offsets below (n * P + p1) * C belong to pixels before p1, as 0 <= c < C.
  s.begin = ((s.n * P) + p0 + s.tp) * C + s.c;
  s.end = (s.n * P + p1) * C;
  s.stride = int64_t(plan.tp) * C;
  return s;
}

// One reduce tile of a channels-last pass over n_samples samples (see reduce_nchw_tile).
template <typename Terms, int W>
__device__ __forceinline__ void reduce_cl_tile(const Terms& terms, const PassTiling& plan,
                                               int64_t n_samples, int64_t C, int64_t P,
                                               typename Terms::A* partial, int64_t block) {
  using A = typename Terms::A;
  constexpr int kQ = Terms::kQ;
  const PixelSpan span = pixel_span<W>(plan, n_samples, C, P, block);

  A acc[kQ][W];
#pragma unroll
  for (int q = 0; q < kQ; ++q)
#pragma unroll
    for (int i = 0; i < W; ++i) acc[q][i] = Terms::init(q);
  if (span.valid) {
    A cv[Terms::kChan][W];
    terms.template channel<W>(span.n * C + span.c, cv);
    walk(span.begin, span.end, span.stride,
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
  if (span.valid && span.tp == 0) {
    const int64_t count = n_samples * C;
#pragma unroll
    for (int i = 0; i < W; ++i) {
      A v[kQ];
#pragma unroll
      for (int q = 0; q < kQ; ++q) v[q] = red[(q * W + i) * kThreads + span.tc];
      const int64_t nc = span.n * C + span.c + i;
      if (partial == nullptr) {
        terms.finalize(nc, v);
      } else {
#pragma unroll
        for (int q = 0; q < kQ; ++q)
          partial[(q * int64_t(plan.pieces) + span.piece) * count + nc] = v[q];
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
__device__ __forceinline__ void map_nchw_tile(const Op& op, const PassTiling& plan, int64_t rows,
                                              int64_t P, int phase, int64_t block) {
  using A = typename Op::A;
  const RowSpan span = row_span(plan, P, block);
  if (span.row >= rows) return;
  A cv[Op::kChan][1];
  op.template channel<1>(span.row, cv);
  walk_row<W>(span.begin, span.end, phase, plan.lanes, span.sub, op,
              [&](auto width, int64_t off, const auto& e) {
                op.template store<decltype(width)::kWidth, 1>(off, e, cv);
              });
}

// One map tile of a channels-last pass over n_samples samples.
template <typename Op, int W>
__device__ __forceinline__ void map_cl_tile(const Op& op, const PassTiling& plan, int64_t n_samples,
                                            int64_t C, int64_t P, int64_t block) {
  using A = typename Op::A;
  const PixelSpan span = pixel_span<W>(plan, n_samples, C, P, block);
  if (!span.valid) return;
  A cv[Op::kChan][W];
  op.template channel<W>(span.n * C + span.c, cv);
  walk(span.begin, span.end, span.stride,
       [&](int64_t off) { return op.template load<W>(off); },
       [&](int64_t off, const auto& e) { op.template store<W, W>(off, e, cv); });
}

// The tile `block` of a pass over the n samples from sample n0, in the plan's layout and
// width; the Terms' or Op's pointers start at sample n0.
template <typename T, typename Terms>
__device__ __forceinline__ void reduce_tile(const Terms& terms, const PassTiling& plan, int64_t n0,
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
__device__ __forceinline__ void map_tile(const Op& op, const PassTiling& plan, int64_t n0,
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

// ---- element bodies that several passes share ---------------------------------------

// out = out_act(s * x + shift + residual): the forward's map (s from the MLP stage, written
// in the same launch when pipelined) and the stream map (kShift: with a per-channel shift).
template <typename T, bool kShift = false>
struct ScaleOp {
  using A = acc_t<T>;
  static constexpr int kChan = kShift ? 2 : 1;
  const T* x;
  const T* residual;  // optional
  T* out;
  const A* s;
  bool relu;
  const A* shift = nullptr;  // with kShift

  template <int W>
  struct Loaded {
    Pack<T, W> x, r;
  };
  template <int AW>
  __device__ void channel(int64_t nc, A (&cv)[kChan][AW]) const {
#pragma unroll
    for (int i = 0; i < AW; ++i) {
      cv[0][i] = ld_fresh(s + nc + i);
      if constexpr (kShift) cv[1][i] = shift[nc + i];
    }
  }
  template <int W>
  __device__ Loaded<W> load(int64_t off) const {
    Loaded<W> e;
    e.x = load_pack<W>(x + off);
    if (residual != nullptr) e.r = load_pack<W>(residual + off);
    return e;
  }
  template <int W, int AW>
  __device__ void store(int64_t off, const Loaded<W>& e, const A (&cv)[kChan][AW]) const {
    Pack<T, W> o;
#pragma unroll
    for (int i = 0; i < W; ++i) {
      A y = to_acc(e.x.v[i]) * cv[0][AW == 1 ? 0 : i];
      if constexpr (kShift) y += cv[1][AW == 1 ? 0 : i];
      if (residual != nullptr) y += to_acc(e.r.v[i]);
      if (relu && y < A(0)) y = A(0);  // NaN stays NaN, as torch.relu
      o.v[i] = from_acc<T>(y);
    }
    store_pack<W>(out + off, o);
  }
};

// What a backward reduce pass reads at `off`: grad_out, x and, under an output ReLU (`out`
// set), out.
template <typename T, int W>
struct GradPacks {
  Pack<T, W> dy, x, out;
};
template <int W, typename T>
__device__ __forceinline__ GradPacks<T, W> load_grad_packs(const T* grad_out, const T* x,
                                                           const T* out, int64_t off) {
  GradPacks<T, W> e;
  e.dy = load_pack<W>(grad_out + off);
  e.x = load_pack<W>(x + off);
  if (out != nullptr) e.out = load_pack<W>(out + off);
  return e;
}

}  // namespace detail
}  // namespace se_kernels::cuda
