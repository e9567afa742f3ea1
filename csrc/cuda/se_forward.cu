// Forward kernels of the "cuda" backend.
//
// Per group of samples (all of them unless they overflow the L2 budget, see group_size):
//   1. reduce pass: z = pool(x) per (n, c)  [+ combine kernel when rows are split]
//   2. hidden:      a = W1 z + b1, h = act(a)       (rows_dot_kernel, rows of W1)
//   3. gate:        g = W2 h + b2, s = gate(g)      (rows_dot_kernel, rows of W2)
//   4. map pass:    out = out_act(s * x + residual)
// Step 4 re-reads the group's x, which step 1 read moments before: with the group sized
// to half the L2, that second read comes from L2 rather than DRAM, so x costs one DRAM
// read per forward (the floor of DESIGN.md §2).
//
// Alternatives not taken until measured on a GPU (DESIGN.md §3.1): thread-block clusters
// on sm_90 and L2 eviction hints.
#include <cstdlib>
#include <mutex>

#include "se_cuda_common.cuh"

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

int64_t group_size(int64_t N, int64_t bytes_per_sample) {
  // Read on every call (it is cheap) so tests can force the grouped schedule.
  const char* env = std::getenv("SE_KERNELS_CUDA_GROUP_BYTES");
  const int64_t budget = env != nullptr && *env != '\0'
                             ? std::atoll(env)
                             : current_device_info().l2_bytes / 2;
  if (budget <= 0 || N * bytes_per_sample <= budget) return std::max<int64_t>(N, 1);
  return std::clamp<int64_t>(budget / bytes_per_sample, 1, N);
}

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
  __device__ void fold(A (&acc)[kQ][AW], const Pack<T, W>& e, const A (&)[kChan][AW]) const {
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

// out = out_act(s * x + residual).
template <typename T>
struct ScaleOp {
  using A = acc_t<T>;
  static constexpr int kChan = 1;
  const T* x;
  const T* residual;  // optional
  T* out;
  const A* s;
  bool relu;

  template <int W>
  struct Loaded {
    Pack<T, W> x, r;
  };
  template <int AW>
  __device__ void channel(int64_t nc, A (&cv)[kChan][AW]) const {
#pragma unroll
    for (int i = 0; i < AW; ++i) cv[0][i] = s[nc + i];
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
      if (residual != nullptr) y += to_acc(e.r.v[i]);
      if (relu && y < A(0)) y = A(0);  // NaN stays NaN, as torch.relu
      o.v[i] = from_acc<T>(y);
    }
    store_pack<W>(out + off, o);
  }
};

// out[n, r] = epilogue(sum_k W[r, k] * in[n, k]) for a [R, K] row-major weight and an
// accumulation-dtype [N, K] input. A group of `lanes` threads takes one row r and kTile
// samples; the sum runs over k in lane-strided order, then a butterfly across the lanes:
// the same order for every call of the same shape.
template <typename T, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
    rows_dot_kernel(const T* weight, const acc_t<T>* in, int64_t N, int64_t R, int64_t K,
                    int lanes, int64_t row_blocks, Epilogue epilogue) {
  using A = acc_t<T>;
  const int64_t block = blockIdx.x;
  const int64_t n0 = (block / row_blocks) * kTile;
  const int64_t r = (block % row_blocks) * (kThreads / lanes) + threadIdx.x / lanes;
  const int sub = threadIdx.x % lanes;
  const int nt = static_cast<int>(min64(kTile, N - n0));
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
        if (t < nt) acc[t] += wv * inp[t * K + k];
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

template <typename T, typename Epilogue>
void run_rows_dot(const T* weight, const acc_t<T>* in, int64_t N, int64_t R, int64_t K,
                  const Epilogue& epilogue, cudaStream_t stream) {
  const int lanes = lanes_for(K);
  const int64_t row_blocks = ceil_div(R, kThreads / lanes);
  const int64_t ctas = row_blocks * ceil_div(N, kTile);
  TORCH_CHECK(ctas <= INT_MAX, "se_kernels: excitation MLP too large for the cuda backend");
  launch(rows_dot_kernel<T, Epilogue>, ctas, kThreads, stream, weight, in, N, R, K, lanes,
         row_blocks, epilogue);
}

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

// Workspace layout (accumulation dtype): s [N, C], h [N, S], pool partials (kWorkspaceGap
// apart: nothing on the GPU, guards on the emulator).
struct ForwardWorkspace {
  int64_t s, h, partial, total;
};
ForwardWorkspace forward_workspace(const Plan& plan, int64_t partial_elems) {
  const Problem& pb = plan.problem;
  ForwardWorkspace w;
  w.s = 0;
  w.h = w.s + pb.N * pb.C + kWorkspaceGap;
  w.partial = w.h + pb.N * pb.S + kWorkspaceGap;
  w.total = w.partial + partial_elems;
  return w;
}

template <typename T>
void forward(const Plan& plan, const ForwardArgs& args, cudaStream_t stream) {
  using A = acc_t<T>;
  const Problem& pb = plan.problem;
  const int64_t N = pb.N, C = pb.C, P = pb.P, S = pb.S;
  const auto* x = static_cast<const T*>(args.x);
  const auto* residual = static_cast<const T*>(args.residual);
  const auto* w1 = static_cast<const T*>(args.w1);
  const auto* w2 = static_cast<const T*>(args.w2);
  const auto* b1 = static_cast<const T*>(args.b1);
  const auto* b2 = static_cast<const T*>(args.b2);
  auto* out = static_cast<T*>(args.out);
  auto* z = static_cast<A*>(args.z);
  auto* zmax = static_cast<A*>(args.zmax);
  auto* a = static_cast<A*>(args.a);
  auto* g = static_cast<A*>(args.g);
  auto* ws = static_cast<A*>(args.workspace);
  const ForwardWorkspace layout = forward_workspace(plan, 0);
  A* s = ws + layout.s;
  A* h = ws + layout.h;
  A* partial = ws + layout.partial;
  workspace_region("s", s, N * C * sizeof(A));
  workspace_region("h", h, N * S * sizeof(A));
  workspace_region("partial", partial, (plan.workspace_elems - layout.partial) * sizeof(A));

  for (int64_t n0 = 0; n0 < N; n0 += plan.group) {
    const int64_t n = std::min(plan.group, N - n0);
    const int64_t x_off = n0 * C * P;
    const PassPlan pass = plan_pass(n, C, P, pb.channels_last, plan.width, plan.sm_count);
    TORCH_INTERNAL_ASSERT(layout.partial + partial_elems(pass, n, C, PoolTerms<T>::kQ) <=
                          plan.workspace_elems);

    const PoolTerms<T> pool{x + x_off, z + n0 * C, zmax ? zmax + n0 * C : nullptr, pb.opt.pool, P};
    run_reduce<T>(pool, pass, n, C, P, partial, stream);
    run_rows_dot<T>(w1, z + n0 * C, n, S, C,
                    HiddenEpilogue<T>{b1, a + n0 * S, h + n0 * S, S, pb.opt.activation}, stream);
    run_rows_dot<T>(w2, h + n0 * S, n, C, S,
                    GateEpilogue<T>{b2, g + n0 * C, s + n0 * C, C, pb.opt.gate}, stream);
    const ScaleOp<T> scale{x + x_off, residual ? residual + x_off : nullptr, out + x_off,
                           s + n0 * C, pb.opt.out_relu()};
    run_map<T>(scale, pass, n, C, P, stream);
  }
}

}  // namespace
}  // namespace detail

Plan plan_forward(const Problem& problem, const ForwardArgs& args) {
  using namespace detail;
  Plan plan{};
  plan.problem = problem;
  const DeviceInfo device = current_device_info();
  plan.sm_count = device.sm_count;
  const int64_t row = problem.channels_last ? problem.C : problem.P;
  dispatch_dtype(problem.dtype, [&](auto tag) {
    using T = decltype(tag);
    plan.width = pass_width<T>(row, {args.x, args.residual, args.out});
  });
  const int64_t esize = element_size(problem.dtype);
  plan.group = group_size(problem.N, problem.C * problem.P * esize);
  plan.workspace_elems = forward_workspace(plan, group_partial_elems(problem, plan)).total;
  return plan;
}

void launch_forward(const Plan& plan, const ForwardArgs& args, cudaStream_t stream) {
  detail::dispatch_dtype(plan.problem.dtype, [&](auto tag) {
    detail::forward<decltype(tag)>(plan, args, stream);
  });
}

}  // namespace se_kernels::cuda
