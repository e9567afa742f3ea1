// How the "cuda" backend splits one SE call into launches, CTAs and work items: the plan
// that se_forward.cu / se_backward.cu launch. It composes the parts: the schedule the
// environment selects (se_env.h), the groups of samples sized to the L2 budget, the
// pipelined schedule's work items over the tilings of se_tiling.h, and the workspace the
// call needs (se_workspace.h). Free of CUDA and torch headers (c10's checks only), so the
// main extension compiles it without nvcc and traces it for `se-kernels plan`
// (se_plan_trace.h) on any machine. DESIGN.md §3.1 gives the schedules and the numbers
// behind their constants.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "se_env.h"
#include "se_problem.h"
#include "se_tiling.h"
#include "se_trace.h"
#include "se_workspace.h"

namespace se_kernels::cuda {
namespace detail {

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
// sizes (stage_bytes) and the trace (se_plan_trace.h's trace_stage) both read it.
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

// Accumulation-dtype elements of the reduce tiles' partial sums, where the passes split rows.
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

// The workspace of a planned call (se_workspace.h).
inline WorkspaceLayout workspace_layout(const Plan& plan, bool backward) {
  const int64_t counters = plan.schedule == Schedule::Pipelined ? plan.pipe.counters : 0;
  return workspace_layout(plan.problem, backward, plan.outer.partial_elems,
                          reduce_partial_elems(plan), counters);
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

}  // namespace detail

using detail::Plan;

}  // namespace se_kernels::cuda
