// How the "cuda" backend splits one SE call into launches, CTAs and work items: the plan
// that se_forward.cu / se_backward.cu launch, and the trace of memory accesses that
// `se-kernels plan` models (se_kernels/plan.py). Free of CUDA and torch headers (c10's
// checks only), so the main extension compiles it without nvcc and answers `plan` on any
// machine. DESIGN.md §3.1 gives the schedules and the numbers behind their constants.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "../se_options.h"

// Plan structs travel to the kernels by value; the few methods they call there are these.
#ifdef __CUDACC__
#define SE_PLAN_HOST_DEVICE __host__ __device__
#else
#define SE_PLAN_HOST_DEVICE
#endif

namespace se_kernels::cuda {

enum class DType { Half, BFloat16, Float, Double };

inline int64_t element_size(DType dtype) {
  switch (dtype) {
    case DType::Half:
    case DType::BFloat16: return 2;
    case DType::Float: return 4;
    case DType::Double: return 8;
  }
  return 0;
}
// Bytes of the accumulation dtype (fp32; fp64 for fp64).
inline int64_t acc_size(DType dtype) { return dtype == DType::Double ? 8 : 4; }

// One SE call's shapes and options. x is [N, C, H, W] with P = H * W, dense in NCHW or
// channels-last; w1 is [S, C], w2 is [C, S], both contiguous. `residual`: the forward adds
// one; the backward writes its gradient (only with an output ReLU, else it is grad_out).
struct Problem {
  DType dtype;
  int64_t N, C, P, S;
  bool channels_last;
  Options opt;
  bool residual;
};

struct DeviceInfo {
  int sm_count;
  int64_t l2_bytes;
};

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

// ---- the schedules --------------------------------------------------------------------

// pipelined (default): per call one kernel that zeroes the sync counters, one persistent
//   kernel that runs every stage of every sample group as work items taken in ticket order,
//   and (backward) the weight-gradient kernels. Launches do not grow with N.
// grouped: per L2-sized group, one launch per stage (reduce [+ combine], two MLP products,
//   map). Kept for comparison on a GPU: SE_KERNELS_CUDA_SCHEDULE=grouped.
enum class Schedule { Pipelined, Grouped };

inline Schedule schedule_from_env() {
  const char* env = std::getenv("SE_KERNELS_CUDA_SCHEDULE");
  if (env == nullptr || *env == '\0' || std::string_view(env) == "pipelined")
    return Schedule::Pipelined;
  TORCH_CHECK(std::string_view(env) == "grouped",
              "se_kernels: SE_KERNELS_CUDA_SCHEDULE must be 'pipelined' or 'grouped', got '",
              env, "'");
  return Schedule::Grouped;
}

// CTAs per SM of the pipelined schedule's persistent grid, which is also the minimum that
// its kernel's __launch_bounds__ promises: 2 (default) caps a thread at 128 registers, and
// the backward spills; 1 lets it use up to 255, spilling little or nothing, at half the
// resident warps. SE_KERNELS_CUDA_CTAS_PER_SM=1 selects the latter, so a GPU can measure
// which costs less (DESIGN.md §3.1).
inline int pipeline_ctas_per_sm_from_env() {
  const char* env = std::getenv("SE_KERNELS_CUDA_CTAS_PER_SM");
  if (env == nullptr || *env == '\0' || std::string_view(env) == "2") return 2;
  TORCH_CHECK(std::string_view(env) == "1",
              "se_kernels: SE_KERNELS_CUDA_CTAS_PER_SM must be '1' or '2', got '", env, "'");
  return 1;
}

// ---- the trace `se-kernels plan` models ------------------------------------------------
// Per launch: kernel code, CTAs, access count, then (tensor code, byte offset, bytes,
// is_write) per access in the order the launch makes them. The codes index
// se_kernels/schedule.py's CUDA_TRACE_KERNELS and TRACE_TENSORS.
enum class TraceKernel : int64_t {
  ZeroSync = 0, ForwardPipeline, BackwardPipeline, Reduce, Combine, Mlp, Map, WeightGrad,
  WeightGradCombine
};
enum class TraceTensor : int64_t {
  X = 0, Residual, Out, GradOut, Dx, Dresidual, Weights, Scratch
};

struct Trace {
  std::vector<int64_t> data;
  size_t count_at = 0;
  void launch(TraceKernel kernel, int64_t ctas) {
    data.insert(data.end(), {static_cast<int64_t>(kernel), ctas, 0});
    count_at = data.size() - 1;
  }
  void access(TraceTensor tensor, int64_t offset, int64_t bytes, bool write) {
    if (bytes <= 0) return;
    data.insert(data.end(), {static_cast<int64_t>(tensor), offset, bytes, write ? 1 : 0});
    ++data[count_at];
  }
};

// ---- the stages ---------------------------------------------------------------------------

// The stages of a pipelined call, in ticket order within a step: step k holds the reduce
// tiles of group k, the two MLP stages of group k - min(lag, 1), then the map tiles of
// group k - lag. Every wait is on items with smaller tickets, which running CTAs hold.
enum Stage : int { kReduce = 0, kMlp1 = 1, kMlp2 = 2, kMap = 3, kStages = 4 };

struct Pipeline {
  int64_t group;      // samples per full group
  int64_t groups;
  int lag;            // steps from a group's reduce tiles to its map tiles (0, 1 or 2)
  PassTiling pass;      // tiles of a full group (the last group's spare tiles do nothing)
  MlpTiling mlp1, mlp2;
  int64_t step_items; // tickets per step
  int64_t steps;      // groups + lag
  int ctas_per_sm;    // 1 or 2: the grid's CTAs per SM, and the kernel's launch bound
  int64_t ctas;       // persistent grid: ctas_per_sm per SM, or one per ticket if fewer
  int64_t counters;   // uint32 sync counters: one ticket + 3 per group

  SE_PLAN_HOST_DEVICE int64_t stage_begin(int s) const {
    switch (s) {
      case kReduce: return 0;
      case kMlp1: return pass.ctas;
      case kMlp2: return pass.ctas + mlp1.items;
      default: return pass.ctas + mlp1.items + mlp2.items;
    }
  }
  SE_PLAN_HOST_DEVICE int stage_lag(int s) const {
    return s == kReduce ? 0 : s == kMap ? lag : lag < 1 ? lag : 1;
  }
};

struct Plan {
  Problem problem;
  Schedule schedule;
  int width;          // elements per access in the streaming passes: 16 bytes' worth, or 1
  int sm_count;
  int64_t l2_bytes;
  int64_t group;      // grouped: samples per L2-sized group
  Pipeline pipe;      // pipelined
  OuterPlan outer;    // backward
  int64_t workspace_elems;
};

// The x-shaped tensors one stage of a group reads and writes, in the order it touches them;
// each access covers the group's planes. The one record of what the stages touch: the group
// sizes (stage_bytes) and the trace (trace_stage) both read it.
struct PlaneAccesses {
  struct Access {
    TraceTensor tensor;
    bool write;
  };
  Access at[5];
  int count = 0;
  void add(TraceTensor tensor, bool write) { at[count++] = {tensor, write}; }
  const Access* begin() const { return at; }
  const Access* end() const { return at + count; }
};
inline PlaneAccesses plane_accesses(const Problem& pb, bool backward, int stage, Schedule schedule) {
  using TT = TraceTensor;
  const bool relu = pb.opt.out_relu(), dres = relu && pb.residual;
  // The pipelined backward writes dresidual (the masked dy) in its reduce stage, so its map
  // stage re-reads that one tensor instead of grad_out and out.
  const bool dres_early = schedule == Schedule::Pipelined && dres;
  PlaneAccesses a;
  if (stage == kReduce && !backward) {
    a.add(TT::X, false);
  } else if (stage == kReduce) {
    a.add(TT::GradOut, false);
    a.add(TT::X, false);
    if (relu) a.add(TT::Out, false);
    if (dres_early) a.add(TT::Dresidual, true);
  } else if (stage == kMap && !backward) {
    a.add(TT::X, false);
    if (pb.residual) a.add(TT::Residual, false);
    a.add(TT::Out, true);
  } else if (stage == kMap) {
    if (dres_early) {
      a.add(TT::Dresidual, false);
    } else {
      a.add(TT::GradOut, false);
      if (relu) a.add(TT::Out, false);
    }
    if (pb.opt.uses_max()) a.add(TT::X, false);
    a.add(TT::Dx, true);
    if (dres && !dres_early) a.add(TT::Dresidual, true);
  }
  return a;
}

// Bytes per sample the reduce stage and the map stage touch.
struct StageBytes {
  int64_t reduce, map;
};
inline StageBytes stage_bytes(const Problem& pb, bool backward, Schedule schedule) {
  const int64_t plane = pb.C * pb.P * element_size(pb.dtype);
  return {plane * plane_accesses(pb, backward, kReduce, schedule).count,
          plane * plane_accesses(pb, backward, kMap, schedule).count};
}

// The L2 budget: bytes the pipeline may touch between a group's first read and its re-read.
// SE_KERNELS_CUDA_GROUP_BYTES overrides it (tests use it to force many groups; 0 or less
// puts the whole batch in one group).
inline int64_t l2_budget(int64_t l2_bytes) {
  const char* env = std::getenv("SE_KERNELS_CUDA_GROUP_BYTES");
  if (env != nullptr && *env != '\0') return std::atoll(env);
  return l2_bytes / 2;
}

// Samples per group of the grouped schedule: a group's first-pass bytes fit the budget.
inline int64_t grouped_size(int64_t N, int64_t bytes_per_sample, int64_t budget) {
  if (budget <= 0 || N * bytes_per_sample <= budget) return std::max<int64_t>(N, 1);
  return std::clamp<int64_t>(budget / std::max<int64_t>(bytes_per_sample, 1), 1, N);
}

// The pipeline of a call. Its window, from a group's reduce tiles to its map tiles, spans
// lag + 1 steps, every stage's bytes in between counted (the weights once per step). The
// longest lag whose window fits the budget with one sample per group (lag 2 keeps the map
// tiles a step behind the MLP stages they wait on; lag 0 runs a group's stages back to
// back), then the largest group.
inline Pipeline plan_pipeline(const Problem& pb, bool backward, int width, int sm_count,
                              int ctas_per_sm, int64_t budget) {
  const StageBytes b = stage_bytes(pb, backward, Schedule::Pipelined);
  const int64_t per_sample = std::max<int64_t>(b.reduce + b.map, 1);
  const int64_t weights = 2 * pb.C * pb.S * element_size(pb.dtype);
  Pipeline p{};
  p.lag = 2;
  while (p.lag > 0 && budget > 0 && (p.lag + 1) * (per_sample + weights) > budget) --p.lag;
  p.group = budget <= 0 ? pb.N
                        : std::clamp<int64_t>((budget / (p.lag + 1) - weights) / per_sample, 1,
                                              pb.N);
  p.groups = ceil_div(pb.N, p.group);
  p.pass = tile_pass(pb, p.group, width, sm_count);
  if (!backward) {
    p.mlp1 = rows_dot_tiling(pb.S, pb.C, p.group);
    p.mlp2 = rows_dot_tiling(pb.C, pb.S, p.group);
  } else {
    p.mlp1 = cols_dot_tiling(pb.S, p.group);
    p.mlp2 = cols_dot_tiling(pb.C, p.group);
  }
  p.step_items = 2 * p.pass.ctas + p.mlp1.items + p.mlp2.items;
  p.steps = p.groups + p.lag;
  // Tickets are uint32; every CTA takes one past the last.
  TORCH_CHECK(p.steps <= INT64_MAX / p.step_items && p.steps * p.step_items <= UINT32_MAX / 2,
              "se_kernels: the cuda backend's pipeline needs more than 2^31 work items");
  p.ctas_per_sm = ctas_per_sm;
  p.ctas = std::min<int64_t>(int64_t(sm_count) * ctas_per_sm, p.steps * p.step_items);
  p.counters = 1 + 3 * p.groups;
  return p;
}

// ---- workspace ---------------------------------------------------------------------------

#ifndef SE_KERNELS_CUDA_EMULATION
// The CPU emulation in tests/cuda_emulator leaves NaN gaps between a workspace's buffers.
constexpr int64_t kWorkspaceGap = 0;
#endif

// Offsets (accumulation-dtype elements) of the scratch buffers in one call's workspace;
// a buffer the call does not use has no elements. [N, C]: s, dg, count, dx_avg, dx_max;
// [N, S]: h, da; reduce partials; weight-gradient partials; uint32 sync counters.
struct WorkspaceLayout {
  int64_t s, h, dg, count, dx_avg, dx_max, da, partial, outer, counters, total;
};

inline int64_t reduce_partial_elems(const Plan& plan) {
  const Problem& pb = plan.problem;
  if (plan.schedule == Schedule::Pipelined)  // every group keeps its own partials
    return plan.pipe.pass.pieces > 1
               ? plan.pipe.groups * 2 * plan.pipe.pass.pieces * plan.pipe.group * pb.C : 0;
  int64_t elems = 0;  // a full group or the last, smaller one, which may split rows more
  for (const int64_t n : {std::min(plan.group, pb.N), pb.N % plan.group}) {
    if (n == 0) continue;
    const PassTiling pass = tile_pass(pb, n, plan.width, plan.sm_count);
    if (pass.pieces > 1) elems = std::max(elems, 2 * pass.pieces * n * pb.C);
  }
  return elems;
}

inline WorkspaceLayout workspace_layout(const Plan& plan, bool backward) {
  const Problem& pb = plan.problem;
  const int64_t nc = pb.N * pb.C, ns = pb.N * pb.S;
  const bool uses_max = pb.opt.uses_max(), uses_avg = pb.opt.uses_avg();
  WorkspaceLayout w{};
  int64_t at = 0;
  auto take = [&](int64_t elems) {
    const int64_t begin = at;
    if (elems > 0) at += elems + kWorkspaceGap;
    return begin;
  };
  w.s = take(nc);
  w.h = take(ns);
  if (backward) {
    w.dg = take(nc);
    w.count = take(uses_max ? nc : 0);
    w.dx_avg = take(uses_avg ? nc : 0);
    w.dx_max = take(uses_max ? nc : 0);
    w.da = take(ns);
    w.outer = take(plan.outer.partial_elems);
  }
  w.partial = take(reduce_partial_elems(plan));
  const int64_t counters =
      plan.schedule == Schedule::Pipelined ? plan.pipe.counters : 0;
  w.counters = take(ceil_div(counters * 4, acc_size(pb.dtype)));
  w.total = at;
  return w;
}

// The whole plan of one call, for a device with `device`'s SMs and L2, on the schedule that
// SE_KERNELS_CUDA_SCHEDULE selects (pipelined: with SE_KERNELS_CUDA_CTAS_PER_SM's grid).
// `width`: elements per access the pointers allow.
inline Plan make_plan(const Problem& pb, bool backward, int width, DeviceInfo device) {
  Plan plan{};
  plan.problem = pb;
  plan.schedule = schedule_from_env();
  const int ctas_per_sm = pipeline_ctas_per_sm_from_env();  // checked whatever the schedule
  plan.width = width;
  plan.sm_count = std::max(device.sm_count, 1);
  plan.l2_bytes = device.l2_bytes;
  const int64_t budget = l2_budget(device.l2_bytes);
  if (plan.schedule == Schedule::Pipelined) {
    if (pb.N > 0)
      plan.pipe = plan_pipeline(pb, backward, width, plan.sm_count, ctas_per_sm, budget);
  } else {
    plan.group = grouped_size(pb.N, stage_bytes(pb, backward, Schedule::Grouped).reduce, budget);
  }
  if (backward) plan.outer = plan_outer(pb.N, pb.C, pb.S, plan.sm_count);
  plan.workspace_elems = workspace_layout(plan, backward).total;
  return plan;
}

// Kernel launches of the weight gradients (backward, after the passes over x).
inline void trace_weight_grads(const Plan& plan, Trace& t) {
  const Problem& pb = plan.problem;
  const OuterPlan& o = plan.outer;
  const int64_t acc = acc_size(pb.dtype), esize = element_size(pb.dtype);
  const int64_t weights = pb.C * pb.S * esize;
  t.launch(TraceKernel::WeightGrad, (o.tiles2 + o.tiles1) * o.chunks);
  t.access(TraceTensor::Scratch, 0, 2 * pb.N * (pb.C + pb.S) * acc, false);  // dg, h, da, z
  if (o.chunks == 1) {
    t.access(TraceTensor::Weights, 0, 2 * weights + (pb.C + pb.S) * esize, true);
    return;
  }
  t.access(TraceTensor::Scratch, 0, o.partial_elems * acc, true);
  t.launch(TraceKernel::WeightGradCombine, ceil_div(outer_outputs(pb.C, pb.S), kThreads));
  t.access(TraceTensor::Scratch, 0, o.partial_elems * acc, false);
  t.access(TraceTensor::Weights, 0, 2 * weights + (pb.C + pb.S) * esize, true);
}

// The reduce tiles' partial sums, 2 per (piece, sample, channel), when rows are split:
// written by the tiles, read back by the combine.
inline void trace_partials(const Plan& plan, const PassTiling& pass, int64_t n0, int64_t n,
                           bool write, Trace& t) {
  if (pass.pieces == 1) return;
  const int64_t per_sample = 2 * pass.pieces * plan.problem.C * acc_size(plan.problem.dtype);
  const int64_t at = plan.schedule == Schedule::Pipelined ? n0 * per_sample : 0;  // own or reused
  t.access(TraceTensor::Scratch, at, n * per_sample, write);
}

// What the stages of one group of n samples starting at sample n0, tiled by `pass`, touch.
inline void trace_stage(const Plan& plan, bool backward, int stage, const PassTiling& pass,
                        int64_t n0, int64_t n, Trace& t) {
  const Problem& pb = plan.problem;
  const int64_t plane = pb.C * pb.P * element_size(pb.dtype);
  for (const auto& a : plane_accesses(pb, backward, stage, plan.schedule))
    t.access(a.tensor, n0 * plane, n * plane, a.write);
  if (stage == kReduce) trace_partials(plan, pass, n0, n, true, t);
  if (stage == kMlp1 || stage == kMlp2) {
    const int64_t weights = pb.C * pb.S * element_size(pb.dtype);
    t.access(TraceTensor::Weights, stage == kMlp1 ? 0 : weights, weights, false);
  }
}

// The launches of a planned call and the accesses each makes, in order (see Trace).
inline std::vector<int64_t> trace(const Plan& plan, bool backward) {
  const Problem& pb = plan.problem;
  Trace t;
  if (pb.N == 0) {
    if (backward) trace_weight_grads(plan, t);
    return t.data;
  }
  if (plan.schedule == Schedule::Pipelined) {
    const Pipeline& p = plan.pipe;
    t.launch(TraceKernel::ZeroSync, ceil_div(p.counters, kThreads));
    t.access(TraceTensor::Scratch, 0, p.counters * 4, true);
    t.launch(backward ? TraceKernel::BackwardPipeline : TraceKernel::ForwardPipeline, p.ctas);
    for (int64_t k = 0; k < p.steps; ++k)
      for (int s = 0; s < kStages; ++s) {
        const int64_t g = k - p.stage_lag(s);
        if (g < 0 || g >= p.groups) continue;
        const int64_t n0 = g * p.group, n = std::min(p.group, pb.N - n0);
        trace_stage(plan, backward, s, p.pass, n0, n, t);
        if (s == kReduce) trace_partials(plan, p.pass, n0, n, false, t);  // the combine
      }
  } else {
    for (int64_t n0 = 0; n0 < pb.N; n0 += plan.group) {
      const int64_t n = std::min(plan.group, pb.N - n0);
      const PassTiling pass = tile_pass(pb, n, plan.width, plan.sm_count);
      t.launch(TraceKernel::Reduce, pass.ctas);
      trace_stage(plan, backward, kReduce, pass, n0, n, t);
      if (pass.pieces > 1) {
        t.launch(TraceKernel::Combine, ceil_div(n * pb.C, kThreads));
        trace_partials(plan, pass, n0, n, false, t);
      }
      const MlpTiling m1 = backward ? cols_dot_tiling(pb.S, n) : rows_dot_tiling(pb.S, pb.C, n);
      const MlpTiling m2 = backward ? cols_dot_tiling(pb.C, n) : rows_dot_tiling(pb.C, pb.S, n);
      t.launch(TraceKernel::Mlp, m1.items);
      trace_stage(plan, backward, kMlp1, pass, n0, n, t);
      t.launch(TraceKernel::Mlp, m2.items);
      trace_stage(plan, backward, kMlp2, pass, n0, n, t);
      t.launch(TraceKernel::Map, pass.ctas);
      trace_stage(plan, backward, kMap, pass, n0, n, t);
    }
  }
  if (backward) trace_weight_grads(plan, t);
  return t.data;
}

}  // namespace detail

using detail::Plan;

}  // namespace se_kernels::cuda
