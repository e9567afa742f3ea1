// How the cuda backend cuts its work into CTAs: the tiles of a streaming pass over x
// (PassTiling, walked by se_cuda_tiles.cuh), the work items of the MLP products
// (MlpTiling, se_cuda_mlp.cuh) and the output tiles and batch chunks of the weight
// gradients (OuterPlan, se_backward.cu), with the CTA size and occupancy targets they are
// sized by. Functions of the shapes and the SM count only; the plan (se_plan.h) applies
// them to each group of samples. Free of CUDA and torch headers (c10's checks only).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "se_problem.h"

// Tilings travel to the kernels by value; the few functions they call there are these.
#ifdef __CUDACC__
#define SE_PLAN_HOST_DEVICE __host__ __device__
#else
#define SE_PLAN_HOST_DEVICE
#endif

namespace se_kernels::cuda {
namespace detail {

constexpr int kThreads = 256;        // every kernel's CTA size (at most)
constexpr int kMinCtasPerSm = 2;     // __launch_bounds__ of the grouped streaming kernels
constexpr int kTargetCtasPerSm = 8;  // a pass is split until it has this many CTAs per SM
constexpr int kUnitsPerLane = 4;     // accesses per thread below which splitting stops
constexpr int kTile = 8;             // samples per CTA in the MLP kernels

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tiling of a streaming pass over n samples of C x P elements (the map and reduce kernels of
// se_cuda_tiles.cuh walk it; see there). A pass with pieces > 1 splits each row (NCHW) or
// each (sample, channel block) (channels-last) along P.
struct PassTiling {
  bool channels_last;
  int width;          // elements per access (the Terms/Op template width is chosen from it)
  int threads;        // CTA size
  int64_t ctas;       // tiles: one CTA's work each
  int pieces;         // spatial pieces per row (NCHW) or per (sample, channel block)
  int64_t piece_len;  // elements (NCHW) or pixels (channels-last) per piece
  // NCHW
  int lanes;            // threads per row
  int64_t row_blocks;   // tiles along the rows
  // channels-last
  int tc, tp;           // channel vectors x pixel lanes per CTA
  int64_t cblocks;      // channel blocks per sample
};

// Threads per NCHW row: enough that each does about kUnitsPerLane accesses, at most a warp.
inline int lanes_for(int64_t units) {
  int lanes = 1;
  while (lanes < 32 && lanes * kUnitsPerLane < units) lanes *= 2;
  return lanes;
}

// A piece of a split row (NCHW) or of a channel block's pixels (channels-last) is at least
// this many bytes per channel: its partial sums (2 x 4 bytes) stay under 1/32 of its data.
constexpr int64_t kMinPieceBytes = 256;

// How a pass over `n` samples of pb's C x P elements is split into tiles. NCHW rows with P not
// a multiple of `width` still use 16-byte accesses: each piece peels its unaligned ends.
// Channels-last tiles take at most a warp's worth of channel vectors (512 contiguous bytes a
// pixel), so wide layers give several channel blocks before pixels are split.
inline PassTiling tile_pass(const Problem& pb, int64_t n, int width, int sm_count) {
  const int64_t C = pb.C, P = pb.P;
  const int64_t target = int64_t(sm_count) * kTargetCtasPerSm;
  const int64_t min_piece = ceil_div(kMinPieceBytes, element_size(pb.dtype));  // elements
  PassTiling p{};
  p.channels_last = pb.channels_last;
  p.width = width;
  if (!pb.channels_last) {
    const int64_t units = ceil_div(P, width);
    const int64_t rows = n * C;
    const int64_t unsplit = ceil_div(rows, kThreads / lanes_for(units));
    const int64_t min_units = std::max<int64_t>(32 * kUnitsPerLane, ceil_div(min_piece, width));
    const int64_t max_pieces = std::max<int64_t>(1, units / min_units);
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
    p.cblocks = ceil_div(cvecs, 32);
    p.tc = static_cast<int>(ceil_div(cvecs, p.cblocks));
    p.tp = std::max(1, kThreads / p.tc);
    p.threads = static_cast<int>(ceil_div(int64_t(p.tc) * p.tp, 32) * 32);
    const int64_t unsplit = n * p.cblocks;
    const int64_t min_pixels = std::max<int64_t>(int64_t(p.tp) * kUnitsPerLane, min_piece);
    const int64_t max_pieces = std::max<int64_t>(1, P / min_pixels);
    const int64_t want = std::clamp<int64_t>(ceil_div(target, unsplit), 1, max_pieces);
    p.piece_len = ceil_div(P, want);
    p.pieces = static_cast<int>(ceil_div(P, p.piece_len));
    p.ctas = unsplit * p.pieces;
  }
  TORCH_CHECK(p.ctas <= INT_MAX, "se_kernels: the cuda backend cannot split a tensor of ", n,
              " x ", C, " x ", P, " elements into fewer than 2^31 blocks");
  return p;
}

// Work items of an MLP product over n samples: `blocks` output blocks x ceil(n / kTile)
// sample tiles. rows_dot (forward, W rows) uses `lanes` threads per output; cols_dot
// (backward, W columns) 32 columns per CTA.
struct MlpTiling {
  int lanes;
  int64_t blocks;
  int64_t items;
};
inline MlpTiling rows_dot_tiling(int64_t R, int64_t K, int64_t n) {
  const int lanes = lanes_for(K);
  const int64_t blocks = ceil_div(R, kThreads / lanes);
  return {lanes, blocks, blocks * ceil_div(n, kTile)};
}
inline MlpTiling cols_dot_tiling(int64_t cols, int64_t n) {
  const int64_t blocks = ceil_div(cols, 32);
  return {32, blocks, blocks * ceil_div(n, kTile)};
}

// The weight gradients dW = sum_n u[n, r] v[n, k] (+ db = sum_n u[n, r]) for both weights:
// 32 x 32 output tiles, the batch cut into `chunks` summed by separate CTAs when the tiles
// alone give fewer than 2 CTAs per SM; with more than one chunk a second kernel adds the
// chunks' partial sums (weight-sized, so only worth it for small weights) in chunk order.
struct OuterPlan {
  int64_t tiles2, tiles1;  // output tiles of dW2 [C, S] and dW1 [S, C]
  int64_t chunks;          // batch chunks
  int64_t chunk_len;       // samples per chunk
  int64_t partial_elems;   // accumulation-dtype scratch (chunks > 1)
};
constexpr int kOuterRows = 32, kOuterCols = 32, kOuterMinChunk = 16;
// dW2 [C, S], db2 [C], dW1 [S, C], db1 [S], in that order in a chunk's partial sums.
SE_PLAN_HOST_DEVICE inline int64_t outer_outputs(int64_t C, int64_t S) { return 2 * C * S + C + S; }
inline OuterPlan plan_outer(int64_t N, int64_t C, int64_t S, int sm_count) {
  OuterPlan o{};
  o.tiles2 = ceil_div(C, kOuterRows) * ceil_div(S, kOuterCols);
  o.tiles1 = ceil_div(S, kOuterRows) * ceil_div(C, kOuterCols);
  const int64_t target = int64_t(sm_count) * kMinCtasPerSm;
  const int64_t max_chunks = std::max<int64_t>(1, N / kOuterMinChunk);
  o.chunks = std::clamp<int64_t>(ceil_div(target, o.tiles2 + o.tiles1), 1, max_chunks);
  o.chunk_len = std::max<int64_t>(1, ceil_div(N, o.chunks));
  o.chunks = std::max<int64_t>(1, ceil_div(N, o.chunk_len));
  o.partial_elems = o.chunks > 1 ? o.chunks * outer_outputs(C, S) : 0;
  return o;
}

}  // namespace detail
}  // namespace se_kernels::cuda
