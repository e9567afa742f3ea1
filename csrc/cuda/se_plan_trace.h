// The trace of a planned call: the launches a Plan (se_plan.h) or a stream op's StreamPlan
// (se_stream_plan.h) makes and, per launch, the ranges of each tensor it reads and writes,
// in the encoding of se_trace.h. It is the schedule that `se-kernels plan`
// (se_kernels/plan.py) runs its DRAM model over, made by the kernels' own planning code;
// tests compare it with the launches real calls log. Only csrc/cuda_schedule.cpp includes
// it. Free of CUDA and torch headers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "se_plan.h"
#include "se_stream_plan.h"
#include "se_trace.h"

namespace se_kernels::cuda {
namespace detail {

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

// ---- the stream ops ------------------------------------------------------------------------

// What a stream op's pass touches, from the pointers its arguments give (what se_stream.cu's
// Terms and Ops load and store): its x-sized tensors in the order a tile touches them, and
// how many [N, C] vectors it reads and writes.
struct StreamAccesses {
  PlaneAccesses streams;
  int vectors_read = 0;
  int vectors_written = 0;
};

inline int count_given(std::initializer_list<const void*> pointers) {
  int given = 0;
  for (const void* p : pointers) given += p != nullptr;
  return given;
}

inline StreamAccesses stream_accesses(const StreamReduceArgs& a) {
  StreamAccesses s;
  s.streams.add(TraceTensor::X, false);
  s.vectors_written = count_given({a.sum, a.sumsq, a.max, a.min});
  return s;
}

inline StreamAccesses stream_accesses(const StreamMapArgs& a) {
  StreamAccesses s;
  s.vectors_read = count_given({a.scale, a.shift});
  s.streams.add(TraceTensor::X, false);
  if (a.residual != nullptr) s.streams.add(TraceTensor::Residual, false);
  s.streams.add(TraceTensor::Out, true);
  return s;
}

inline StreamAccesses stream_accesses(const StreamGradReduceArgs& a) {
  StreamAccesses s;
  s.vectors_read = count_given({a.peak});
  s.streams.add(TraceTensor::GradOut, false);
  s.streams.add(TraceTensor::X, false);
  if (a.out != nullptr) s.streams.add(TraceTensor::Out, false);
  if (a.dresidual != nullptr) s.streams.add(TraceTensor::Dresidual, true);
  s.vectors_written = count_given({a.sdy, a.sdyx, a.count});
  return s;
}

inline StreamAccesses stream_accesses(const StreamGradMapArgs& a) {
  StreamAccesses s;
  s.vectors_read = count_given({a.dy_scale, a.x_scale, a.shift, a.peak, a.peak_shift});
  s.streams.add(TraceTensor::GradOut, false);
  if (a.out != nullptr) s.streams.add(TraceTensor::Out, false);
  if (a.x_scale != nullptr || a.peak != nullptr) s.streams.add(TraceTensor::X, false);
  s.streams.add(TraceTensor::Dx, true);
  return s;
}

// The act tail's ops read x through their [C] or [N, C] prologue vectors (counted as [N, C]).
inline StreamAccesses stream_accesses(const StreamActReduceArgs& a) {
  StreamAccesses s;
  s.vectors_read = count_given({a.in_scale, a.in_shift});
  s.streams.add(TraceTensor::X, false);
  s.vectors_written = count_given({a.sum});
  return s;
}

inline StreamAccesses stream_accesses(const StreamActMapArgs& a) {
  StreamAccesses s;
  s.vectors_read = count_given({a.in_scale, a.in_shift, a.scale});
  s.streams.add(TraceTensor::X, false);
  s.streams.add(TraceTensor::Out, true);
  return s;
}

inline StreamAccesses stream_accesses(const StreamActGradReduceArgs& a) {
  StreamAccesses s;
  s.vectors_read = count_given({a.in_scale, a.in_shift});
  s.streams.add(TraceTensor::GradOut, false);
  s.streams.add(TraceTensor::X, false);
  s.vectors_written = count_given({a.sdyv, a.sdyd, a.sdydx, a.sd, a.sdx});
  return s;
}

inline StreamAccesses stream_accesses(const StreamActGradMapArgs& a) {
  StreamAccesses s;
  s.vectors_read = count_given({a.in_scale, a.in_shift, a.dy_scale, a.act_shift, a.x_scale,
                                a.shift});
  s.streams.add(TraceTensor::GradOut, false);
  s.streams.add(TraceTensor::X, false);
  s.streams.add(TraceTensor::Dx, true);
  return s;
}

// The launches of a planned stream pass (se_stream.cu: a reduce kernel, then the combine
// kernel when rows are split, or a map kernel) and what each touches. The pass walks the
// whole batch once, so each x-sized tensor is one access. Scratch holds the partial sums,
// then the vectors the pass reads, then those it writes.
template <typename Args>
std::vector<int64_t> trace_stream(const StreamPlan& plan, const Args& args) {
  const Problem& pb = plan.problem;
  Trace t;
  if (pb.N == 0) return t.data;
  const StreamAccesses a = stream_accesses(args);
  const int64_t acc = acc_size(pb.dtype);
  const int64_t tensor = pb.N * pb.C * pb.P * element_size(pb.dtype), vector = pb.N * pb.C * acc;
  const int64_t partials = plan.workspace_elems * acc, read = a.vectors_read * vector;
  t.launch(stream_quantities(args) > 0 ? TraceKernel::Reduce : TraceKernel::Map, plan.pass.ctas);
  t.access(TraceTensor::Scratch, partials, read, false);
  for (const auto& s : a.streams) t.access(s.tensor, 0, tensor, s.write);
  if (partials > 0) {
    t.access(TraceTensor::Scratch, 0, partials, true);
    t.launch(TraceKernel::Combine, ceil_div(pb.N * pb.C, kThreads));
    t.access(TraceTensor::Scratch, 0, partials, false);
  }
  t.access(TraceTensor::Scratch, partials + read, a.vectors_written * vector, true);
  return t.data;
}

}  // namespace detail
}  // namespace se_kernels::cuda
