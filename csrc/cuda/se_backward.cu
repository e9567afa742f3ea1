// Backward kernels of the "cuda" backend (math in DESIGN.md §1).
//
// Per group of samples (L2-sized, as in the forward):
//   1. reduce pass: ds = sum_p dy * x (dy = grad_out, zeroed where out <= 0 under an output
//                   ReLU) and, for max pooling, count = #{p : x == zmax}; its finalize
//                   turns ds into dg = ds * gate'(g) and keeps s = gate(g) for step 4
//   2. cols_dot:    dh = dg W2, da = dh * act'(a), h = act(a)
//   3. cols_dot:    dz = da W1 -> the per-channel terms of dx (dz / P; dz / count at maxima)
//   4. map pass:    dx = dy * s + dz / P (+ dz / count where x == zmax); dresidual = dy
// Then, over the whole batch, outer_kernel: dW2 = dg^T h, db2 = sum_n dg, dW1 = da^T z,
// db1 = sum_n da, each output summed over n in order 0..N-1 by one thread (deterministic,
// no atomics).
#include "se_cuda_common.cuh"

namespace se_kernels::cuda {
namespace detail {
namespace {

// [0] = ds = sum of dy * x, [1] = how many x equal the channel's max.
template <typename T>
struct GradTerms {
  using A = acc_t<T>;
  static constexpr int kQ = 2, kChan = 1;
  const T* grad_out;
  const T* out;    // nullptr: no output ReLU
  const T* x;
  const A* zmax;   // nullptr: avg pooling, nothing to count
  // finalize
  const A* g;
  A* dg;
  A* s;
  A* count;        // nullptr: avg pooling
  Gate gate_kind;

  template <int W>
  struct Loaded {
    Pack<T, W> dy, x, out;
  };
  __device__ static A init(int) { return A(0); }
  __device__ static A combine(int, A a, A b) { return a + b; }
  template <int AW>
  __device__ void channel(int64_t nc, A (&cv)[kChan][AW]) const {
#pragma unroll
    for (int i = 0; i < AW; ++i) cv[0][i] = zmax != nullptr ? zmax[nc + i] : A(0);
  }
  template <int W>
  __device__ Loaded<W> load(int64_t off) const {
    Loaded<W> e;
    e.dy = load_pack<W>(grad_out + off);
    e.x = load_pack<W>(x + off);
    if (out != nullptr) e.out = load_pack<W>(out + off);
    return e;
  }
  template <int W, int AW>
  __device__ void fold(A (&acc)[kQ][AW], const Loaded<W>& e, const A (&cv)[kChan][AW]) const {
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const int j = AW == 1 ? 0 : i;
      A dy = to_acc(e.dy.v[i]);
      if (out != nullptr && !(to_acc(e.out.v[i]) > A(0))) dy = A(0);
      const A xv = to_acc(e.x.v[i]);
      acc[0][j] += dy * xv;
      if (zmax != nullptr && xv == cv[0][j]) acc[1][j] += A(1);
    }
  }
  __device__ void finalize(int64_t nc, const A (&v)[kQ]) const {
    const A gv = g[nc];
    const A sv = gate(gv, gate_kind);
    s[nc] = sv;
    dg[nc] = gate_backward(gv, sv, v[0], gate_kind);
    if (count != nullptr) count[nc] = v[1];
  }
};

// dx = dy * s + dx_avg + [x == zmax] * dx_max, and dresidual = dy.
template <typename T>
struct GradInputOp {
  using A = acc_t<T>;
  static constexpr int kChan = 4;  // s, dx_avg, zmax, dx_max
  const T* grad_out;
  const T* out;        // nullptr: no output ReLU
  const T* x;          // read only for max pooling
  T* dx;
  T* dresidual;        // nullptr: not wanted
  const A* s;
  const A* dx_avg;     // nullptr: max pooling
  const A* zmax;       // nullptr: avg pooling
  const A* dx_max;     // nullptr: avg pooling

  template <int W>
  struct Loaded {
    Pack<T, W> dy, out, x;
  };
  template <int AW>
  __device__ void channel(int64_t nc, A (&cv)[kChan][AW]) const {
#pragma unroll
    for (int i = 0; i < AW; ++i) {
      cv[0][i] = s[nc + i];
      cv[1][i] = dx_avg != nullptr ? dx_avg[nc + i] : A(0);
      cv[2][i] = zmax != nullptr ? zmax[nc + i] : A(0);
      cv[3][i] = dx_max != nullptr ? dx_max[nc + i] : A(0);
    }
  }
  template <int W>
  __device__ Loaded<W> load(int64_t off) const {
    Loaded<W> e;
    e.dy = load_pack<W>(grad_out + off);
    if (out != nullptr) e.out = load_pack<W>(out + off);
    if (zmax != nullptr) e.x = load_pack<W>(x + off);
    return e;
  }
  template <int W, int AW>
  __device__ void store(int64_t off, const Loaded<W>& e, const A (&cv)[kChan][AW]) const {
    Pack<T, W> d, r;
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const int j = AW == 1 ? 0 : i;
      A dy = to_acc(e.dy.v[i]);
      if (out != nullptr && !(to_acc(e.out.v[i]) > A(0))) dy = A(0);
      A v = dy * cv[0][j] + cv[1][j];
      if (zmax != nullptr && to_acc(e.x.v[i]) == cv[2][j]) v += cv[3][j];
      d.v[i] = from_acc<T>(v);
      r.v[i] = from_acc<T>(dy);
    }
    store_pack<W>(dx + off, d);
    if (dresidual != nullptr) store_pack<W>(dresidual + off, r);
  }
};

// out[n, col] = epilogue(sum_k in[n, k] * W[k, col]) for a [K, Cols] row-major weight:
// the weight read along its rows (coalesced) for the products with W rather than W^T.
// A CTA takes 32 columns (the lanes) and kTile samples; its 8 warps take interleaved k,
// combined in warp order through shared memory.
template <typename T, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
    cols_dot_kernel(const T* weight, const acc_t<T>* in, int64_t N, int64_t K, int64_t cols,
                    int64_t col_blocks, Epilogue epilogue) {
  using A = acc_t<T>;
  constexpr int kWarps = kThreads / 32;
  const int64_t block = blockIdx.x;
  const int64_t n0 = (block / col_blocks) * kTile;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t col = (block % col_blocks) * 32 + lane;
  const int nt = static_cast<int>(min64(kTile, N - n0));
  A acc[kTile];
#pragma unroll
  for (int t = 0; t < kTile; ++t) acc[t] = A(0);
  if (col < cols) {
    const A* inp = in + n0 * K;
    for (int64_t k = warp; k < K; k += kWarps) {
      const A wv = to_acc(weight[k * cols + col]);
#pragma unroll
      for (int t = 0; t < kTile; ++t)
        if (t < nt) acc[t] += inp[t * K + k] * wv;
    }
  }
  SE_SHARED(A, red, [kWarps][kTile][32]);
#pragma unroll
  for (int t = 0; t < kTile; ++t) red[warp][t][lane] = acc[t];
  __syncthreads();
  if (warp == 0 && col < cols) {
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      if (t >= nt) continue;
      A v = red[0][t][lane];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) v += red[w][t][lane];
      epilogue(n0 + t, col, v);
    }
  }
}

template <typename T, typename Epilogue>
void run_cols_dot(const T* weight, const acc_t<T>* in, int64_t N, int64_t K, int64_t cols,
                  const Epilogue& epilogue, cudaStream_t stream) {
  const int64_t col_blocks = ceil_div(cols, 32);
  const int64_t ctas = col_blocks * ceil_div(N, kTile);
  TORCH_CHECK(ctas <= INT_MAX, "se_kernels: excitation MLP too large for the cuda backend");
  launch(cols_dot_kernel<T, Epilogue>, ctas, kThreads, stream, weight, in, N, K, cols,
         col_blocks, epilogue);
}

// da = dh * act'(a); h = act(a) for the dW2 product.
template <typename T>
struct HiddenGradEpilogue {
  using A = acc_t<T>;
  const A* a;
  A* da;
  A* h;
  int64_t S;
  Activation act;
  __device__ void operator()(int64_t n, int64_t j, A dh) const {
    const A av = a[n * S + j];
    da[n * S + j] = activation_backward(av, dh, act);
    h[n * S + j] = activation(av, act);
  }
};

// dz -> what dx adds per channel: dz / P everywhere (avg), dz / count at the maxima (max),
// each halved for avgmax (z = avg / 2 + max / 2).
template <typename T>
struct PoolGradEpilogue {
  using A = acc_t<T>;
  const A* count;  // nullptr: avg pooling
  A* dx_avg;       // nullptr: max pooling
  A* dx_max;       // nullptr: avg pooling
  int64_t C;
  int64_t P;
  Pool pool;
  __device__ void operator()(int64_t n, int64_t c, A dz) const {
    const int64_t nc = n * C + c;
    switch (pool) {
      case Pool::Avg: dx_avg[nc] = dz / A(P); break;
      case Pool::Max: dx_max[nc] = dz / count[nc]; break;
      case Pool::AvgMax:
        dx_avg[nc] = dz * A(0.5 / static_cast<double>(P));
        dx_max[nc] = dz * A(0.5) / count[nc];
        break;
    }
  }
};

// dW[r, k] = sum_n u[n, r] * v[n, k] and db[r] = sum_n u[n, r], summed in n order. A CTA
// covers 32 columns k (the lanes) x 32 rows r (4 per warp; u is read once per warp).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    outer_kernel(const acc_t<T>* u, const acc_t<T>* v, int64_t N, int64_t R, int64_t K,
                 int64_t k_blocks, T* dw, T* db) {
  using A = acc_t<T>;
  constexpr int kRows = 4;
  const int64_t block = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t k = (block % k_blocks) * 32 + lane;
  const int64_t r0 = (block / k_blocks) * (kThreads / 32 * kRows) + warp * kRows;
  const bool k_valid = k < K;
  A acc[kRows], bias[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc[i] = bias[i] = A(0);
  for (int64_t n = 0; n < N; ++n) {
    const A vv = k_valid ? v[n * K + k] : A(0);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (r0 + i < R) {
        const A uu = u[n * R + r0 + i];
        acc[i] += uu * vv;
        bias[i] += uu;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int64_t r = r0 + i;
    if (r >= R) continue;
    if (k_valid) dw[r * K + k] = from_acc<T>(acc[i]);
    if (k == 0) db[r] = from_acc<T>(bias[i]);
  }
}

template <typename T>
void run_outer(const acc_t<T>* u, const acc_t<T>* v, int64_t N, int64_t R, int64_t K, T* dw,
               T* db, cudaStream_t stream) {
  const int64_t k_blocks = ceil_div(K, 32);
  const int64_t ctas = k_blocks * ceil_div(R, kThreads / 32 * 4);
  TORCH_CHECK(ctas <= INT_MAX, "se_kernels: excitation MLP too large for the cuda backend");
  launch(outer_kernel<T>, ctas, kThreads, stream, u, v, N, R, K, k_blocks, dw, db);
}

// Workspace layout (accumulation dtype): dg, s, count, dx_avg, dx_max [N, C]; da, h [N, S];
// reduce partials. count/dx_max only for max pooling, dx_avg only for avg pooling. Buffers
// are kWorkspaceGap apart: nothing on the GPU, guards on the emulator.
struct BackwardWorkspace {
  int64_t dg, s, count, dx_avg, dx_max, da, h, partial, total;
};
BackwardWorkspace backward_workspace(const Problem& pb, int64_t partial_elems) {
  const int64_t nc = pb.N * pb.C + kWorkspaceGap, ns = pb.N * pb.S + kWorkspaceGap;
  const bool uses_max = pb.opt.uses_max(), uses_avg = pb.opt.uses_avg();
  BackwardWorkspace w;
  w.dg = 0;
  w.s = w.dg + nc;
  w.count = w.s + nc;
  w.dx_avg = w.count + (uses_max ? nc : 0);
  w.dx_max = w.dx_avg + (uses_avg ? nc : 0);
  w.da = w.dx_max + (uses_max ? nc : 0);
  w.h = w.da + ns;
  w.partial = w.h + ns;
  w.total = w.partial + partial_elems;
  return w;
}

template <typename T>
void backward(const Plan& plan, const BackwardArgs& args, cudaStream_t stream) {
  using A = acc_t<T>;
  const Problem& pb = plan.problem;
  const int64_t N = pb.N, C = pb.C, P = pb.P, S = pb.S;
  const bool uses_max = pb.opt.uses_max(), uses_avg = pb.opt.uses_avg();
  const auto* grad_out = static_cast<const T*>(args.grad_out);
  const auto* x = static_cast<const T*>(args.x);
  const auto* out = pb.opt.out_relu() ? static_cast<const T*>(args.out) : nullptr;
  const auto* w1 = static_cast<const T*>(args.w1);
  const auto* w2 = static_cast<const T*>(args.w2);
  const auto* z = static_cast<const A*>(args.z);
  const auto* zmax = uses_max ? static_cast<const A*>(args.zmax) : nullptr;
  const auto* a = static_cast<const A*>(args.a);
  const auto* g = static_cast<const A*>(args.g);
  auto* dx = static_cast<T*>(args.dx);
  auto* dresidual = static_cast<T*>(args.dresidual);
  auto* ws = static_cast<A*>(args.workspace);
  const BackwardWorkspace layout = backward_workspace(pb, 0);
  A* dg = ws + layout.dg;
  A* s = ws + layout.s;
  A* count = uses_max ? ws + layout.count : nullptr;
  A* dx_avg = uses_avg ? ws + layout.dx_avg : nullptr;
  A* dx_max = uses_max ? ws + layout.dx_max : nullptr;
  A* da = ws + layout.da;
  A* h = ws + layout.h;
  A* partial = ws + layout.partial;
  auto at = [](auto* p, int64_t off) { return p != nullptr ? p + off : nullptr; };
  const int64_t nc_bytes = N * C * sizeof(A), ns_bytes = N * S * sizeof(A);
  workspace_region("dg", dg, nc_bytes);
  workspace_region("s", s, nc_bytes);
  workspace_region("count", count, count ? nc_bytes : 0);
  workspace_region("dx_avg", dx_avg, dx_avg ? nc_bytes : 0);
  workspace_region("dx_max", dx_max, dx_max ? nc_bytes : 0);
  workspace_region("da", da, ns_bytes);
  workspace_region("h", h, ns_bytes);
  workspace_region("partial", partial, (plan.workspace_elems - layout.partial) * sizeof(A));

  for (int64_t n0 = 0; n0 < N; n0 += plan.group) {
    const int64_t n = std::min(plan.group, N - n0);
    const int64_t x_off = n0 * C * P, nc = n0 * C, ns = n0 * S;
    const PassPlan pass = plan_pass(n, C, P, pb.channels_last, plan.width, plan.sm_count);
    TORCH_INTERNAL_ASSERT(layout.partial + partial_elems(pass, n, C, GradTerms<T>::kQ) <=
                          plan.workspace_elems);

    const GradTerms<T> terms{grad_out + x_off, at(out, x_off), x + x_off, at(zmax, nc),
                             g + nc, dg + nc, s + nc, at(count, nc), pb.opt.gate};
    run_reduce<T>(terms, pass, n, C, P, partial, stream);
    run_cols_dot<T>(w2, dg + nc, n, C, S,
                    HiddenGradEpilogue<T>{a + ns, da + ns, h + ns, S, pb.opt.activation}, stream);
    run_cols_dot<T>(w1, da + ns, n, S, C,
                    PoolGradEpilogue<T>{at(count, nc), at(dx_avg, nc), at(dx_max, nc), C, P,
                                        pb.opt.pool},
                    stream);
    const GradInputOp<T> op{grad_out + x_off, at(out, x_off), x + x_off,    dx + x_off,
                            at(dresidual, x_off), s + nc,     at(dx_avg, nc), at(zmax, nc),
                            at(dx_max, nc)};
    run_map<T>(op, pass, n, C, P, stream);
  }
  run_outer<T>(dg, h, N, C, S, static_cast<T*>(args.dw2), static_cast<T*>(args.db2), stream);
  run_outer<T>(da, z, N, S, C, static_cast<T*>(args.dw1), static_cast<T*>(args.db1), stream);
}

}  // namespace
}  // namespace detail

Plan plan_backward(const Problem& problem, const BackwardArgs& args) {
  using namespace detail;
  Plan plan{};
  plan.problem = problem;
  plan.sm_count = current_device_info().sm_count;
  const int64_t row = problem.channels_last ? problem.C : problem.P;
  dispatch_dtype(problem.dtype, [&](auto tag) {
    using T = decltype(tag);
    plan.width = pass_width<T>(
        row, {args.grad_out, args.x, problem.opt.out_relu() ? args.out : nullptr, args.dx,
              args.dresidual});
  });
  // Pass 4 re-reads dy (and out, and x for max pooling) after pass 1 read them with x.
  const int64_t esize = element_size(problem.dtype);
  const int64_t streams = 2 + (problem.opt.out_relu() ? 1 : 0);
  plan.group = group_size(problem.N, problem.C * problem.P * esize * streams);
  plan.workspace_elems = backward_workspace(problem, group_partial_elems(problem, plan)).total;
  return plan;
}

void launch_backward(const Plan& plan, const BackwardArgs& args, cudaStream_t stream) {
  detail::dispatch_dtype(plan.problem.dtype, [&](auto tag) {
    detail::backward<decltype(tag)>(plan, args, stream);
  });
}

}  // namespace se_kernels::cuda
