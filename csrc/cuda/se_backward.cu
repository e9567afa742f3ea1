// Backward kernels of the "cuda" backend (math in DESIGN.md §1). The stages, per group:
//   reduce: ds = sum_p dy * x (dy = grad_out, zeroed where out <= 0 under an output ReLU)
//           and, for max pooling, count = #{p : x == zmax}; combined, ds becomes
//           dg = ds * gate'(g), and s = gate(g) is kept for the map stage. The pipelined
//           schedule also writes dresidual (the masked dy) here, so the map stage re-reads
//           one tensor instead of two.
//   mlp1:   dh = dg W2, da = dh * act'(a), h = act(a)           (cols_dot items)
//   mlp2:   dz = da W1 -> the per-channel terms of dx (dz / P; dz / count at maxima)
//   map:    dx = dy * s + dz / P (+ dz / count where x == zmax)
// Then, for the whole batch, the weight gradients dW2 = dg^T h, db2 = sum_n dg,
// dW1 = da^T z, db1 = sum_n da: the batch in chunks summed by separate CTAs, the chunks
// added in order by a second kernel (deterministic, no atomics).
#include "se_cuda_schedules.cuh"

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
  T* dresidual;    // nullptr: not written here
  // finalize
  const A* g;
  A* dg;
  A* s;
  A* count;        // nullptr: avg pooling
  Gate gate_kind;

  template <int W>
  using Loaded = GradPacks<T, W>;
  __device__ static A init(int) { return A(0); }
  __device__ static A combine(int, A a, A b) { return a + b; }
  template <int AW>
  __device__ void channel(int64_t nc, A (&cv)[kChan][AW]) const {
#pragma unroll
    for (int i = 0; i < AW; ++i) cv[0][i] = zmax != nullptr ? zmax[nc + i] : A(0);
  }
  template <int W>
  __device__ Loaded<W> load(int64_t off) const {
    return load_grad_packs<W>(grad_out, x, out, off);
  }
  template <int W, int AW>
  __device__ void fold(int64_t off, A (&acc)[kQ][AW], const Loaded<W>& e,
                       const A (&cv)[kChan][AW]) const {
    Pack<T, W> masked;
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const int j = AW == 1 ? 0 : i;
      A dy = to_acc(e.dy.v[i]);
      if (out != nullptr && !(to_acc(e.out.v[i]) > A(0))) dy = A(0);
      masked.v[i] = from_acc<T>(dy);
      const A xv = to_acc(e.x.v[i]);
      acc[0][j] += dy * xv;
      if (zmax != nullptr && xv == cv[0][j]) acc[1][j] += A(1);
    }
    if (dresidual != nullptr) store_pack<W>(dresidual + off, masked);
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
  bool fresh_dy;       // grad_out was written earlier in the same launch

  template <int W>
  struct Loaded {
    Pack<T, W> dy, out, x;
  };
  template <int AW>
  __device__ void channel(int64_t nc, A (&cv)[kChan][AW]) const {
#pragma unroll
    for (int i = 0; i < AW; ++i) {
      cv[0][i] = ld_fresh(s + nc + i);
      cv[1][i] = dx_avg != nullptr ? ld_fresh(dx_avg + nc + i) : A(0);
      cv[2][i] = zmax != nullptr ? zmax[nc + i] : A(0);
      cv[3][i] = dx_max != nullptr ? ld_fresh(dx_max + nc + i) : A(0);
    }
  }
  template <int W>
  __device__ Loaded<W> load(int64_t off) const {
    Loaded<W> e;
    e.dy = fresh_dy ? load_pack<W, true>(grad_out + off) : load_pack<W>(grad_out + off);
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
      case Pool::Max: dx_max[nc] = dz / ld_fresh(count + nc); break;
      case Pool::AvgMax:
        dx_avg[nc] = dz * A(0.5 / static_cast<double>(P));
        dx_max[nc] = dz * A(0.5) / ld_fresh(count + nc);
        break;
    }
  }
};

// The weight gradients: dW[r, k] = sum_n u[n, r] * v[n, k] and db[r] = sum_n u[n, r] for
// dW2 (u = dg, v = h) and dW1 (u = da, v = z). A CTA covers 32 columns k (the lanes) x 32
// rows r (4 per warp) of one weight, summing the samples of one batch chunk in order.
template <typename T>
struct OuterArgs {
  using A = acc_t<T>;
  const A *dg, *h, *da, *z;
  T *dw2, *db2, *dw1, *db1;
  A* partial;  // chunk partials (OuterPlan::chunks > 1)
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    outer_kernel(OuterArgs<T> args, OuterPlan o, int64_t N, int64_t C, int64_t S) {
  using A = acc_t<T>;
  constexpr int kRows = kOuterRows / (kThreads / 32);
  const int64_t tiles = o.tiles2 + o.tiles1;
  const int64_t chunk = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const bool second = tile < o.tiles2;
  const A* u = second ? args.dg : args.da;
  const A* v = second ? args.h : args.z;
  const int64_t R = second ? C : S, K = second ? S : C;
  const int64_t t = second ? tile : tile - o.tiles2;
  const int64_t k_blocks = (K + kOuterCols - 1) / kOuterCols;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t k = (t % k_blocks) * kOuterCols + lane;
  const int64_t r0 = (t / k_blocks) * kOuterRows + warp * kRows;
  const bool k_valid = k < K;
  A acc[kRows], bias[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc[i] = bias[i] = A(0);
  const int64_t n1 = min64(N, (chunk + 1) * o.chunk_len);
  for (int64_t n = chunk * o.chunk_len; n < n1; ++n) {
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
  // Offsets of this weight's dW and db among a chunk's outputs (outer_outputs).
  const int64_t w_at = second ? 0 : C * S + C, b_at = w_at + C * S;
  A* part = args.partial + chunk * outer_outputs(C, S);
  T* dw = second ? args.dw2 : args.dw1;
  T* db = second ? args.db2 : args.db1;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int64_t r = r0 + i;
    if (r >= R) continue;
    if (o.chunks == 1) {
      if (k_valid) dw[r * K + k] = from_acc<T>(acc[i]);
      if (k == 0) db[r] = from_acc<T>(bias[i]);
    } else {
      if (k_valid) part[w_at + r * K + k] = acc[i];
      if (k == 0) part[b_at + r] = bias[i];
    }
  }
}

// Adds the chunks' partial weight gradients in chunk order: one output per thread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    outer_combine_kernel(OuterArgs<T> args, OuterPlan o, int64_t C, int64_t S) {
  using A = acc_t<T>;
  const int64_t outputs = outer_outputs(C, S);
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= outputs) return;
  A v = args.partial[i];
  for (int64_t c = 1; c < o.chunks; ++c) v += args.partial[c * outputs + i];
  const int64_t cs = C * S;
  if (i < cs) args.dw2[i] = from_acc<T>(v);
  else if (i < cs + C) args.db2[i - cs] = from_acc<T>(v);
  else if (i < 2 * cs + C) args.dw1[i - cs - C] = from_acc<T>(v);
  else args.db1[i - 2 * cs - C] = from_acc<T>(v);
}

template <typename T>
void run_outer(const OuterArgs<T>& args, const OuterPlan& o, int64_t N, int64_t C, int64_t S,
               cudaStream_t stream) {
  launch(TraceKernel::WeightGrad, outer_kernel<T>, (o.tiles2 + o.tiles1) * o.chunks, kThreads,
         stream, args, o, N, C, S);
  if (o.chunks > 1)
    launch(TraceKernel::WeightGradCombine, outer_combine_kernel<T>,
           ceil_div(outer_outputs(C, S), kThreads), kThreads, stream, args, o, C, S);
}

// The backward's pointers, and the stages of one group of n samples from sample n0.
template <typename T>
struct BackwardStages {
  using A = acc_t<T>;
  const T *grad_out, *x, *out, *w1, *w2;
  const A *zmax, *a, *g;
  T *dx, *dresidual;
  A *dg, *s, *count, *dx_avg, *dx_max, *da, *h, *partial;
  int64_t C, P, S, group;
  Options opt;
  PassTiling pass;
  MlpTiling tiling1, tiling2;

  // The reduce stage's terms for samples from n0; `write_dresidual`: it writes dresidual.
  __device__ __host__ GradTerms<T> terms(int64_t n0, bool write_dresidual) const {
    const int64_t off = n0 * C * P, nc = n0 * C;
    return {grad_out + off, out != nullptr ? out + off : nullptr, x + off,
            zmax != nullptr ? zmax + nc : nullptr,
            write_dresidual && dresidual != nullptr ? dresidual + off : nullptr,
            g + nc, dg + nc, s + nc, count != nullptr ? count + nc : nullptr, opt.gate};
  }
  __device__ __host__ PoolGradEpilogue<T> pool_grad(int64_t n0) const {
    const int64_t nc = n0 * C;
    return {count != nullptr ? count + nc : nullptr, dx_avg != nullptr ? dx_avg + nc : nullptr,
            dx_max != nullptr ? dx_max + nc : nullptr, C, P, opt.pool};
  }
  // dx of samples from n0; with `dy_is_dresidual` the masked dy is read back from dresidual.
  __device__ __host__ GradInputOp<T> grad_input(int64_t n0, bool dy_is_dresidual) const {
    const int64_t off = n0 * C * P, nc = n0 * C;
    const bool fresh = dy_is_dresidual && dresidual != nullptr;
    return {fresh ? dresidual + off : grad_out + off,
            fresh || out == nullptr ? nullptr : out + off,
            x + off, dx + off,
            fresh || dresidual == nullptr ? nullptr : dresidual + off,
            s + nc, dx_avg != nullptr ? dx_avg + nc : nullptr,
            zmax != nullptr ? zmax + nc : nullptr, dx_max != nullptr ? dx_max + nc : nullptr,
            fresh};
  }
  __device__ __host__ HiddenGradEpilogue<T> hidden_grad(int64_t n0) const {
    const int64_t ns = n0 * S;
    return {a + ns, da + ns, h + ns, S, opt.activation};
  }

  __device__ A* group_partial(int64_t gi) const {
    return pass.pieces > 1 ? partial + gi * 2 * pass.pieces * group * C : nullptr;
  }
  __device__ void reduce(int64_t tile, int64_t gi, int64_t n0, int64_t n) const {
    reduce_tile<T>(terms(n0, true), pass, n0, n, C, P, group_partial(gi), tile);
  }
  __device__ void combine(int64_t gi, int64_t n0, int64_t n) const {
    const GradTerms<T> t = terms(n0, true);
    for (int64_t nc = threadIdx.x; nc < n * C; nc += blockDim.x)
      combine_one(t, group_partial(gi), pass.pieces, n * C, nc);
  }
  __device__ void mlp1(int64_t item, int64_t n0, int64_t n) const {
    cols_dot_item(w2, dg + n0 * C, n, C, S, tiling1, hidden_grad(n0), item);
  }
  __device__ void mlp2(int64_t item, int64_t n0, int64_t n) const {
    cols_dot_item(w1, da + n0 * S, n, S, C, tiling2, pool_grad(n0), item);
  }
  __device__ void map(int64_t tile, int64_t n0, int64_t n) const {
    map_tile<T>(grad_input(n0, true), pass, n0, n, C, P, tile);
  }
};

template <typename T>
void backward(const Plan& plan, const BackwardArgs& args, cudaStream_t stream) {
  using A = acc_t<T>;
  const Problem& pb = plan.problem;
  const int64_t N = pb.N, C = pb.C, P = pb.P, S = pb.S;
  const bool uses_max = pb.opt.uses_max(), uses_avg = pb.opt.uses_avg();
  auto* ws = static_cast<A*>(args.workspace);
  const WorkspaceLayout layout = workspace_layout(plan, true);
  BackwardStages<T> st{};
  st.grad_out = static_cast<const T*>(args.grad_out);
  st.x = static_cast<const T*>(args.x);
  st.out = pb.opt.out_relu() ? static_cast<const T*>(args.out) : nullptr;
  st.w1 = static_cast<const T*>(args.w1);
  st.w2 = static_cast<const T*>(args.w2);
  st.zmax = uses_max ? static_cast<const A*>(args.zmax) : nullptr;
  st.a = static_cast<const A*>(args.a);
  st.g = static_cast<const A*>(args.g);
  st.dx = static_cast<T*>(args.dx);
  st.dresidual = static_cast<T*>(args.dresidual);
  st.dg = ws + layout.dg;
  st.s = ws + layout.s;
  st.count = uses_max ? ws + layout.count : nullptr;
  st.dx_avg = uses_avg ? ws + layout.dx_avg : nullptr;
  st.dx_max = uses_max ? ws + layout.dx_max : nullptr;
  st.da = ws + layout.da;
  st.h = ws + layout.h;
  st.partial = ws + layout.partial;
  st.C = C, st.P = P, st.S = S;
  st.opt = pb.opt;
  const int64_t nc_bytes = N * C * sizeof(A), ns_bytes = N * S * sizeof(A);
  workspace_region("dg", st.dg, nc_bytes);
  workspace_region("s", st.s, nc_bytes);
  workspace_region("count", st.count, st.count ? nc_bytes : 0);
  workspace_region("dx_avg", st.dx_avg, st.dx_avg ? nc_bytes : 0);
  workspace_region("dx_max", st.dx_max, st.dx_max ? nc_bytes : 0);
  workspace_region("da", st.da, ns_bytes);
  workspace_region("h", st.h, ns_bytes);
  workspace_region("partial", st.partial, reduce_partial_elems(plan) * sizeof(A));
  const OuterArgs<T> outer{st.dg, st.h, st.da, static_cast<const A*>(args.z),
                           static_cast<T*>(args.dw2), static_cast<T*>(args.db2),
                           static_cast<T*>(args.dw1), static_cast<T*>(args.db1),
                           ws + layout.outer};
  workspace_region("outer", outer.partial, plan.outer.partial_elems * sizeof(A));

  if (N > 0 && plan.schedule == Schedule::Pipelined) {
    run_pipeline(TraceKernel::BackwardPipeline, st, plan.pipe, N, ws + layout.counters, stream);
  } else {
    for (int64_t n0 = 0; n0 < N; n0 += plan.group) {
      const int64_t n = std::min(plan.group, N - n0);
      const PassTiling pass = tile_pass(pb, n, plan.width, plan.sm_count);
      run_reduce<T>(st.terms(n0, false), pass, n0, n, C, P, st.partial, stream);
      const MlpTiling m1 = cols_dot_tiling(S, n), m2 = cols_dot_tiling(C, n);
      launch(TraceKernel::Mlp, cols_dot_kernel<T, HiddenGradEpilogue<T>>, m1.items, kThreads,
             stream, st.w2, st.dg + n0 * C, n, C, S, m1, st.hidden_grad(n0));
      launch(TraceKernel::Mlp, cols_dot_kernel<T, PoolGradEpilogue<T>>, m2.items, kThreads,
             stream, st.w1, st.da + n0 * S, n, S, C, m2, st.pool_grad(n0));
      run_map<T>(st.grad_input(n0, false), pass, n0, n, C, P, stream);
    }
  }
  run_outer<T>(outer, plan.outer, N, C, S, stream);
}

}  // namespace
}  // namespace detail

Plan plan_backward(const Problem& problem, const BackwardArgs& args) {
  using namespace detail;
  Problem pb = problem;
  pb.residual = args.dresidual != nullptr;
  int width = 1;
  dispatch_dtype(pb.dtype, [&](auto tag) {
    using T = decltype(tag);
    width = pass_width<T>(pb.channels_last ? pb.C : pb.P, pb.channels_last,
                          {args.grad_out, args.x, pb.opt.out_relu() ? args.out : nullptr,
                           args.dx, args.dresidual});
  });
  return make_plan(pb, true, width, current_device_info());
}

void launch_backward(const Plan& plan, const BackwardArgs& args, cudaStream_t stream) {
  detail::dispatch_dtype(plan.problem.dtype, [&](auto tag) {
    detail::backward<decltype(tag)>(plan, args, stream);
  });
}

}  // namespace se_kernels::cuda
