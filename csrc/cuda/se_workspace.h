// The layout of one call's workspace: the accumulation-dtype scratch buffers of both
// directions in one allocation, which the caller makes with the torch allocator (se_cuda.h)
// so the op stays in torch's memory pool and CUDA-graph capture. se_forward.cu and
// se_backward.cu slice it at these offsets; the plan (se_plan.h) supplies the sizes its
// tiling decides and records the total. Free of CUDA and torch headers.
#pragma once

#include <cstdint>

#include "se_problem.h"
#include "se_tiling.h"

namespace se_kernels::cuda {
namespace detail {

#ifndef SE_KERNELS_CUDA_EMULATION
// The CPU emulation in tools/cuda_emulator leaves NaN gaps between a workspace's buffers.
constexpr int64_t kWorkspaceGap = 0;
#endif

// Offsets (accumulation-dtype elements) of the scratch buffers in one call's workspace;
// a buffer the call does not use has no elements. [N, C]: s, dg, count, dx_avg, dx_max;
// [N, S]: h, da; reduce partials; weight-gradient partials; uint32 sync counters.
struct WorkspaceLayout {
  int64_t s, h, dg, count, dx_avg, dx_max, da, partial, outer, counters, total;
};

// The layout for `pb` in one direction, given the sizes the plan's tiling decides: the
// weight-gradient partials (backward) and the reduce partials, in accumulation-dtype
// elements, and the uint32 sync counters.
inline WorkspaceLayout workspace_layout(const Problem& pb, bool backward, int64_t outer_partials,
                                        int64_t reduce_partials, int64_t counters) {
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
    w.outer = take(outer_partials);
  }
  w.partial = take(reduce_partials);
  w.counters = take(ceil_div(counters * 4, acc_size(pb.dtype)));
  w.total = at;
  return w;
}

}  // namespace detail
}  // namespace se_kernels::cuda
