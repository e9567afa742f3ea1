// Forward kernels of the "cuda" backend. The stages, per group of samples:
//   reduce: z = pool(x) per (n, c)                      (partials per tile, then combined)
//   mlp1:   a = W1 z + b1, h = act(a)                   (rows_dot items, rows of W1)
//   mlp2:   g = W2 h + b2, s = gate(g)                  (rows_dot items, rows of W2)
//   map:    out = out_act(s * x + residual)
// The map stage re-reads the group's x soon after the reduce stage read it, so the re-read
// comes from L2: the pipelined schedule (one persistent kernel, se_cuda_schedules.cuh) sizes
// its groups so that everything touched in between fits half the L2; the grouped schedule
// launches the four stages group after group. DESIGN.md §3.1 compares them.
#include <cstdlib>
#include <mutex>

#include "se_cuda_schedules.cuh"

namespace se_kernels::cuda {
namespace detail {

#ifndef SE_KERNELS_CUDA_EMULATION
DeviceInfo current_device_info() {
  constexpr int kMaxDevices = 64;
  static DeviceInfo infos[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "se_kernels: CUDA device index ", device,
              " out of range");
  std::call_once(once[device], [device] {
    int sms = 0, l2 = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    infos[device] = DeviceInfo{std::max(sms, 1), l2};
  });
  return infos[device];
}
#endif

namespace {

// Pooling: [0] = sum of x, [1] = max of x; finalize writes z (and zmax).
template <typename T>
struct PoolTerms {
  using A = acc_t<T>;
  static constexpr int kQ = 2, kChan = 1;
  const T* x;
  A* z;
  A* zmax;  // nullptr for avg pooling
  Pool pool;
  int64_t P;

  __device__ static A init(int q) { return q == 0 ? A(0) : -A(INFINITY); }
  __device__ static A combine(int q, A a, A b) { return q == 0 ? a + b : nan_max(a, b); }
  template <int AW>
  __device__ void channel(int64_t, A (&cv)[kChan][AW]) const {
#pragma unroll
    for (int i = 0; i < AW; ++i) cv[0][i] = A(0);  // pooling reads no per-channel values
  }
  template <int W>
  __device__ Pack<T, W> load(int64_t off) const { return load_pack<W>(x + off); }
  template <int W, int AW>
  __device__ void fold(int64_t, A (&acc)[kQ][AW], const Pack<T, W>& e,
                       const A (&)[kChan][AW]) const {
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const A v = to_acc(e.v[i]);
      const int j = AW == 1 ? 0 : i;
      acc[0][j] += v;
      acc[1][j] = nan_max(acc[1][j], v);
    }
  }
  __device__ void finalize(int64_t nc, const A (&v)[kQ]) const {
    const A avg = v[0] / A(P);
    switch (pool) {
      case Pool::Avg: z[nc] = avg; break;
      case Pool::Max: z[nc] = v[1]; break;
      case Pool::AvgMax: z[nc] = avg * A(0.5) + v[1] * A(0.5); break;
    }
    if (zmax != nullptr) zmax[nc] = v[1];
  }
};

// a = sum + b1, h = act(a)
template <typename T>
struct HiddenEpilogue {
  using A = acc_t<T>;
  const T* b1;  // optional
  A* a;
  A* h;
  int64_t S;
  Activation act;
  __device__ void operator()(int64_t n, int64_t j, A sum) const {
    const A v = b1 != nullptr ? sum + to_acc(b1[j]) : sum;
    a[n * S + j] = v;
    h[n * S + j] = activation(v, act);
  }
};

// g = sum + b2, s = gate(g)
template <typename T>
struct GateEpilogue {
  using A = acc_t<T>;
  const T* b2;  // optional
  A* g;
  A* s;
  int64_t C;
  Gate kind;
  __device__ void operator()(int64_t n, int64_t c, A sum) const {
    const A v = b2 != nullptr ? sum + to_acc(b2[c]) : sum;
    g[n * C + c] = v;
    s[n * C + c] = gate(v, kind);
  }
};

// The forward's pointers, and the stages of one group of n samples from sample n0.
template <typename T>
struct ForwardStages {
  using A = acc_t<T>;
  const T *x, *residual, *w1, *b1, *w2, *b2;
  T* out;
  A *z, *zmax, *a, *g, *s, *h, *partial;
  int64_t C, P, S, group;
  Options opt;
  PassTiling pass;
  MlpTiling tiling1, tiling2;

  __device__ PoolTerms<T> pool_terms(int64_t n0) const {
    return {x + n0 * C * P, z + n0 * C, zmax != nullptr ? zmax + n0 * C : nullptr, opt.pool, P};
  }
  __device__ A* group_partial(int64_t g) const {
    return pass.pieces > 1 ? partial + g * 2 * pass.pieces * group * C : nullptr;
  }
  __device__ void reduce(int64_t tile, int64_t gi, int64_t n0, int64_t n) const {
    reduce_tile<T>(pool_terms(n0), pass, n0, n, C, P, group_partial(gi), tile);
  }
  __device__ void combine(int64_t gi, int64_t n0, int64_t n) const {
    const PoolTerms<T> terms = pool_terms(n0);
    for (int64_t nc = threadIdx.x; nc < n * C; nc += blockDim.x)
      combine_one(terms, group_partial(gi), pass.pieces, n * C, nc);
  }
  __device__ void mlp1(int64_t item, int64_t n0, int64_t n) const {
    rows_dot_item(w1, z + n0 * C, n, S, C, tiling1,
                  HiddenEpilogue<T>{b1, a + n0 * S, h + n0 * S, S, opt.activation}, item);
  }
  __device__ void mlp2(int64_t item, int64_t n0, int64_t n) const {
    rows_dot_item(w2, h + n0 * S, n, C, S, tiling2,
                  GateEpilogue<T>{b2, g + n0 * C, s + n0 * C, C, opt.gate}, item);
  }
  __device__ void map(int64_t tile, int64_t n0, int64_t n) const {
    const int64_t off = n0 * C * P;
    const ScaleOp<T> op{x + off, residual != nullptr ? residual + off : nullptr, out + off,
                        s + n0 * C, opt.out_relu()};
    map_tile<T>(op, pass, n0, n, C, P, tile);
  }
};

template <typename T>
void forward(const Plan& plan, const ForwardArgs& args, cudaStream_t stream) {
  using A = acc_t<T>;
  const Problem& pb = plan.problem;
  const int64_t N = pb.N, C = pb.C, P = pb.P, S = pb.S;
  auto* ws = static_cast<A*>(args.workspace);
  const WorkspaceLayout layout = workspace_layout(plan, false);
  ForwardStages<T> st{};
  st.x = static_cast<const T*>(args.x);
  st.residual = static_cast<const T*>(args.residual);
  st.w1 = static_cast<const T*>(args.w1);
  st.b1 = static_cast<const T*>(args.b1);
  st.w2 = static_cast<const T*>(args.w2);
  st.b2 = static_cast<const T*>(args.b2);
  st.out = static_cast<T*>(args.out);
  st.z = static_cast<A*>(args.z);
  st.zmax = static_cast<A*>(args.zmax);
  st.a = static_cast<A*>(args.a);
  st.g = static_cast<A*>(args.g);
  st.s = ws + layout.s;
  st.h = ws + layout.h;
  st.partial = ws + layout.partial;
  st.C = C, st.P = P, st.S = S;
  st.opt = pb.opt;
  workspace_region("s", st.s, N * C * sizeof(A));
  workspace_region("h", st.h, N * S * sizeof(A));
  workspace_region("partial", st.partial, reduce_partial_elems(plan) * sizeof(A));

  if (plan.schedule == Schedule::Pipelined) {
    run_pipeline(TraceKernel::ForwardPipeline, st, plan.pipe, N, ws + layout.counters, stream);
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += plan.group) {
    const int64_t n = std::min(plan.group, N - n0);
    const PassTiling pass = tile_pass(pb, n, plan.width, plan.sm_count);
    const PoolTerms<T> pool{st.x + n0 * C * P, st.z + n0 * C,
                            st.zmax != nullptr ? st.zmax + n0 * C : nullptr, pb.opt.pool, P};
    run_reduce<T>(pool, pass, n0, n, C, P, st.partial, stream);
    const MlpTiling m1 = rows_dot_tiling(S, C, n), m2 = rows_dot_tiling(C, S, n);
    launch(TraceKernel::Mlp, rows_dot_kernel<T, HiddenEpilogue<T>>, m1.items, kThreads, stream,
           st.w1, st.z + n0 * C, n, S, C, m1,
           HiddenEpilogue<T>{st.b1, st.a + n0 * S, st.h + n0 * S, S, pb.opt.activation});
    launch(TraceKernel::Mlp, rows_dot_kernel<T, GateEpilogue<T>>, m2.items, kThreads, stream,
           st.w2, st.h + n0 * S, n, C, S, m2,
           GateEpilogue<T>{st.b2, st.g + n0 * C, st.s + n0 * C, C, pb.opt.gate});
    const int64_t off = n0 * C * P;
    const ScaleOp<T> scale{st.x + off, st.residual != nullptr ? st.residual + off : nullptr,
                           st.out + off, st.s + n0 * C, pb.opt.out_relu()};
    run_map<T>(scale, pass, n0, n, C, P, stream);
  }
}

}  // namespace
}  // namespace detail

Plan plan_forward(const Problem& problem, const ForwardArgs& args) {
  using namespace detail;
  Problem pb = problem;
  pb.residual = args.residual != nullptr;
  int width = 1;
  dispatch_dtype(pb.dtype, [&](auto tag) {
    using T = decltype(tag);
    width = pass_width<T>(pb.channels_last ? pb.C : pb.P, pb.channels_last,
                          {args.x, args.residual, args.out});
  });
  return make_plan(pb, false, width, current_device_info());
}

void launch_forward(const Plan& plan, const ForwardArgs& args, cudaStream_t stream) {
  detail::dispatch_dtype(plan.problem.dtype, [&](auto tag) {
    detail::forward<decltype(tag)>(plan, args, stream);
  });
}

}  // namespace se_kernels::cuda
