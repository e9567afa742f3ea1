// How a stream op (se_stream.h, DESIGN.md §1.4) cuts its one pass over x into launches: the
// plan that se_stream.cu launches and that se_kernels::cuda_stream_schedule
// (csrc/cuda_schedule.cpp) traces for `se-kernels plan`. The ops' arguments are here too, so
// that the trace reads the same pointers as the kernels. Free of CUDA and torch headers
// (c10's checks only).
#pragma once

#include <cstdint>

#include "se_problem.h"
#include "se_tiling.h"

namespace se_kernels::cuda {

// Pointers: x-sized tensors dense in the problem's layout and dtype, [N, C] vectors in the
// accumulation dtype; nullptr for an optional input absent or an output not asked for; the
// workspace, plan.workspace_elems elements (none for a map pass).
struct StreamReduceArgs {
  const void* x;
  void* sum;
  void* sumsq;  // optional
  void* max;    // optional
  void* min;    // optional
  void* workspace;
};

struct StreamMapArgs {
  const void* x;
  const void* scale;
  const void* shift;     // optional
  const void* residual;  // optional
  bool relu;
  void* out;
  void* workspace;
};

struct StreamGradReduceArgs {
  const void* grad_out;
  const void* out;   // only under an output ReLU
  const void* x;
  const void* peak;  // optional
  void* sdy;         // optional
  void* sdyx;
  void* count;       // with peak
  void* dresidual;   // optional: the masked dy
  void* workspace;
};

struct StreamGradMapArgs {
  const void* grad_out;
  const void* out;  // only under an output ReLU
  const void* x;
  const void* dy_scale;
  const void* x_scale;     // optional
  const void* shift;       // optional
  const void* peak;        // optional, with peak_shift
  const void* peak_shift;
  void* dx;
  void* workspace;
};

// The act tail's ops: x read through u = in_scale * x + in_shift, v = activation(u), with
// in_scale and in_shift [N, C] (a [C] one broadcast).
struct StreamActReduceArgs {
  const void* x;
  const void* in_scale;
  const void* in_shift;
  Activation activation;
  void* sum;
  void* workspace;
};

struct StreamActMapArgs {
  const void* x;
  const void* in_scale;
  const void* in_shift;
  Activation activation;
  const void* scale;
  void* out;
  void* workspace;
};

struct StreamActGradReduceArgs {
  const void* grad_out;
  const void* x;
  const void* in_scale;
  const void* in_shift;
  Activation activation;
  void* sdyv;
  void* sdyd;   // optional (statistics), with the three below
  void* sdydx;
  void* sd;
  void* sdx;
  void* workspace;
};

struct StreamActGradMapArgs {
  const void* grad_out;
  const void* x;
  const void* in_scale;
  const void* in_shift;
  Activation activation;
  const void* dy_scale;
  const void* act_shift;
  const void* x_scale;  // optional
  const void* shift;    // optional
  void* dx;
  void* workspace;
};

// A stream pass: the problem (S and the SE options unused), its tiles, and its scratch.
struct StreamPlan {
  Problem problem;
  detail::PassTiling pass;
  int64_t workspace_elems;
};

namespace detail {

// The quantities a reduce pass folds per (n, c) (its Terms' kQ, se_stream.cu), each with a
// partial sum per piece when rows are split; a map pass folds none.
constexpr int kStreamReduceQuantities = 4;      // Σx, Σx², max, min
constexpr int kStreamGradReduceQuantities = 3;  // Σdy, Σdy·x, #{x == peak}
constexpr int kStreamActReduceQuantities = 1;      // Σv
constexpr int kStreamActGradReduceQuantities = 5;  // Σdy·v, Σdy·d, Σdy·d·x, Σd, Σd·x
inline int stream_quantities(const StreamReduceArgs&) { return kStreamReduceQuantities; }
inline int stream_quantities(const StreamGradReduceArgs&) { return kStreamGradReduceQuantities; }
inline int stream_quantities(const StreamActReduceArgs&) { return kStreamActReduceQuantities; }
inline int stream_quantities(const StreamActGradReduceArgs&) {
  return kStreamActGradReduceQuantities;
}
inline int stream_quantities(const StreamMapArgs&) { return 0; }
inline int stream_quantities(const StreamGradMapArgs&) { return 0; }
inline int stream_quantities(const StreamActMapArgs&) { return 0; }
inline int stream_quantities(const StreamActGradMapArgs&) { return 0; }

// The tiles of a pass over the whole batch, `width` elements per access, on `sm_count` SMs,
// and the scratch of its partial sums when a reduce pass splits rows into pieces.
inline StreamPlan plan_stream_pass(const Problem& pb, int width, int sm_count, int quantities) {
  StreamPlan plan{pb, {}, 0};
  if (pb.N == 0) return plan;
  plan.pass = tile_pass(pb, pb.N, width, sm_count);
  if (plan.pass.pieces > 1)
    plan.workspace_elems = int64_t(quantities) * plan.pass.pieces * pb.N * pb.C;
  return plan;
}

}  // namespace detail
}  // namespace se_kernels::cuda
