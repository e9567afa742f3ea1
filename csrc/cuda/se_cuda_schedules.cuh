// The two schedules that run the tiles and MLP items: grouped (one kernel per stage and
// L2-sized group of samples) and pipelined (one persistent kernel taking ticketed work
// items, with the sync protocol between them). DESIGN.md §3.1 says why the pipeline.
#pragma once

#include <algorithm>
#include <cstdint>

#include "se_cuda_mlp.cuh"
#include "se_cuda_options.cuh"
#include "se_cuda_tiles.cuh"

namespace se_kernels::cuda {
namespace detail {

// ---- the grouped schedule: one kernel per stage and group --------------------------------

template <typename T, typename Terms>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
    reduce_kernel(Terms terms, PassTiling plan, int64_t n0, int64_t n, int64_t C, int64_t P,
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
    map_kernel(Op op, PassTiling plan, int64_t n0, int64_t n, int64_t C, int64_t P) {
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
void run_reduce(const Terms& terms, const PassTiling& plan, int64_t n0, int64_t n, int64_t C,
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
void run_map(const Op& op, const PassTiling& plan, int64_t n0, int64_t n, int64_t C, int64_t P,
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
