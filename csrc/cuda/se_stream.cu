// The stream ops' kernels (se_stream.h): the four passes of the staged path, and the act
// tail's four, as Terms and Ops on the streaming tiles of se_cuda_tiles.cuh (the map pass
// is the forward's ScaleOp, with a shift when given), each launched over the whole batch by the grouped schedule's kernels:
// a reduce kernel, plus the combine kernel when the plan splits rows into pieces, or a map
// kernel.
// Every value is computed in the accumulation dtype in _stream_ops.reference's order and
// rounded once; masks multiply, as there, so an infinite or NaN coefficient under a false
// mask gives NaN just as the reference does.
#include "se_cuda_schedules.cuh"
#include "se_stream.h"

namespace se_kernels::cuda {
namespace detail {
namespace {

// An optional [N, C] input's values for channels nc, nc + 1, ... (0 where it is absent).
template <int AW, typename A>
__device__ __forceinline__ void channel_values(const A* v, int64_t nc, A (&out)[AW]) {
#pragma unroll
  for (int i = 0; i < AW; ++i) out[i] = v != nullptr ? v[nc + i] : A(0);
}

// [0] = Σ x, [1] = Σ x², [2] = max, [3] = min (NaN propagates through both).
template <typename T>
struct ReduceTerms {
  using A = acc_t<T>;
  static constexpr int kQ = kStreamReduceQuantities, kChan = 1;
  const T* x;
  A* sum;
  A* sumsq;  // nullptr: not asked for (likewise max and min)
  A* max;
  A* min;

  __device__ static A init(int q) { return q == 2 ? -A(INFINITY) : q == 3 ? A(INFINITY) : A(0); }
  __device__ static A combine(int q, A a, A b) {
    return q == 2 ? nan_max(a, b) : q == 3 ? nan_min(a, b) : a + b;
  }
  template <int AW>
  __device__ void channel(int64_t, A (&cv)[kChan][AW]) const {
#pragma unroll
    for (int i = 0; i < AW; ++i) cv[0][i] = A(0);  // the pass reads no per-channel values
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
      acc[1][j] += v * v;
      acc[2][j] = nan_max(acc[2][j], v);
      acc[3][j] = nan_min(acc[3][j], v);
    }
  }
  __device__ void finalize(int64_t nc, const A (&v)[kQ]) const {
    sum[nc] = v[0];
    if (sumsq != nullptr) sumsq[nc] = v[1];
    if (max != nullptr) max[nc] = v[2];
    if (min != nullptr) min[nc] = v[3];
  }
};

// Element i of a loaded dy: grad_out, times [out > 0] under an output ReLU (`out` set).
template <typename T, typename Loaded>
__device__ __forceinline__ acc_t<T> masked_dy(const Loaded& e, int i, const T* out) {
  using A = acc_t<T>;
  A dy = to_acc(e.dy.v[i]);
  if (out != nullptr) dy *= A(to_acc(e.out.v[i]) > A(0));
  return dy;
}

// [0] = Σ dy, [1] = Σ dy·x, [2] = #{x == peak}; writes dresidual = dy when asked.
template <typename T>
struct GradReduceTerms {
  using A = acc_t<T>;
  static constexpr int kQ = kStreamGradReduceQuantities, kChan = 1;  // peak
  const T* grad_out;
  const T* out;   // nullptr: no output ReLU
  const T* x;
  const A* peak;  // nullptr: nothing to count
  T* dresidual;   // optional
  A* sdy;         // optional
  A* sdyx;
  A* count;       // with peak

  template <int W>
  using Loaded = GradPacks<T, W>;
  __device__ static A init(int) { return A(0); }
  __device__ static A combine(int, A a, A b) { return a + b; }
  template <int AW>
  __device__ void channel(int64_t nc, A (&cv)[kChan][AW]) const {
    channel_values<AW>(peak, nc, cv[0]);
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
      const A dy = masked_dy(e, i, out);
      const A xv = to_acc(e.x.v[i]);
      masked.v[i] = from_acc<T>(dy);
      acc[0][j] += dy;
      acc[1][j] += dy * xv;
      if (peak != nullptr && xv == cv[0][j]) acc[2][j] += A(1);
    }
    if (dresidual != nullptr) store_pack<W>(dresidual + off, masked);
  }
  __device__ void finalize(int64_t nc, const A (&v)[kQ]) const {
    if (sdy != nullptr) sdy[nc] = v[0];
    sdyx[nc] = v[1];
    if (count != nullptr) count[nc] = v[2];
  }
};

// dx = dy_scale * dy + x_scale * x + shift + [x == peak] * peak_shift.
template <typename T>
struct GradMapOp {
  using A = acc_t<T>;
  static constexpr int kChan = 5;  // dy_scale, x_scale, shift, peak, peak_shift
  const T* grad_out;
  const T* out;  // nullptr: no output ReLU
  const T* x;    // read only with x_scale or peak
  T* dx;
  const A* dy_scale;
  const A* x_scale;     // optional
  const A* shift;       // optional
  const A* peak;        // optional, with peak_shift
  const A* peak_shift;

  template <int W>
  struct Loaded {
    Pack<T, W> dy, out, x;
  };
  template <int AW>
  __device__ void channel(int64_t nc, A (&cv)[kChan][AW]) const {
    channel_values<AW>(dy_scale, nc, cv[0]);
    channel_values<AW>(x_scale, nc, cv[1]);
    channel_values<AW>(shift, nc, cv[2]);
    channel_values<AW>(peak, nc, cv[3]);
    channel_values<AW>(peak_shift, nc, cv[4]);
  }
  template <int W>
  __device__ Loaded<W> load(int64_t off) const {
    Loaded<W> e;
    e.dy = load_pack<W>(grad_out + off);
    if (out != nullptr) e.out = load_pack<W>(out + off);
    if (x_scale != nullptr || peak != nullptr) e.x = load_pack<W>(x + off);
    return e;
  }
  template <int W, int AW>
  __device__ void store(int64_t off, const Loaded<W>& e, const A (&cv)[kChan][AW]) const {
    Pack<T, W> d;
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const int j = AW == 1 ? 0 : i;
      A v = cv[0][j] * masked_dy(e, i, out);
      if (x_scale != nullptr) v += cv[1][j] * to_acc(e.x.v[i]);
      if (shift != nullptr) v += cv[2][j];
      if (peak != nullptr) v += A(to_acc(e.x.v[i]) == cv[3][j]) * cv[4][j];
      d.v[i] = from_acc<T>(v);
    }
    store_pack<W>(dx + off, d);
  }
};

// ---- the act tail's passes: x read through u = a·x + b, v = act(u), d = act'(u) ----------

// [0] = Σ v.
template <typename T>
struct ActReduceTerms {
  using A = acc_t<T>;
  static constexpr int kQ = kStreamActReduceQuantities, kChan = 2;  // in_scale, in_shift
  const T* x;
  const A* in_scale;
  const A* in_shift;
  Activation act;
  A* sum;

  __device__ static A init(int) { return A(0); }
  __device__ static A combine(int, A a, A b) { return a + b; }
  template <int AW>
  __device__ void channel(int64_t nc, A (&cv)[kChan][AW]) const {
    channel_values<AW>(in_scale, nc, cv[0]);
    channel_values<AW>(in_shift, nc, cv[1]);
  }
  template <int W>
  __device__ Pack<T, W> load(int64_t off) const { return load_pack<W>(x + off); }
  template <int W, int AW>
  __device__ void fold(int64_t, A (&acc)[kQ][AW], const Pack<T, W>& e,
                       const A (&cv)[kChan][AW]) const {
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const int j = AW == 1 ? 0 : i;
      acc[0][j] += activation(cv[0][j] * to_acc(e.v[i]) + cv[1][j], act);
    }
  }
  __device__ void finalize(int64_t nc, const A (&v)[kQ]) const { sum[nc] = v[0]; }
};

// out = scale * v.
template <typename T>
struct ActMapOp {
  using A = acc_t<T>;
  static constexpr int kChan = 3;  // in_scale, in_shift, scale
  const T* x;
  T* out;
  const A* in_scale;
  const A* in_shift;
  Activation act;
  const A* scale;

  template <int W>
  struct Loaded {
    Pack<T, W> x;
  };
  template <int AW>
  __device__ void channel(int64_t nc, A (&cv)[kChan][AW]) const {
    channel_values<AW>(in_scale, nc, cv[0]);
    channel_values<AW>(in_shift, nc, cv[1]);
    channel_values<AW>(scale, nc, cv[2]);
  }
  template <int W>
  __device__ Loaded<W> load(int64_t off) const {
    return Loaded<W>{load_pack<W>(x + off)};
  }
  template <int W, int AW>
  __device__ void store(int64_t off, const Loaded<W>& e, const A (&cv)[kChan][AW]) const {
    Pack<T, W> o;
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const int j = AW == 1 ? 0 : i;
      o.v[i] = from_acc<T>(cv[2][j] * activation(cv[0][j] * to_acc(e.x.v[i]) + cv[1][j], act));
    }
    store_pack<W>(out + off, o);
  }
};

// [0] = Σ dy·v and, with statistics (sdyd set), [1] = Σ dy·d, [2] = Σ dy·d·x, [3] = Σ d,
// [4] = Σ d·x.
template <typename T>
struct ActGradReduceTerms {
  using A = acc_t<T>;
  static constexpr int kQ = kStreamActGradReduceQuantities, kChan = 2;  // in_scale, in_shift
  const T* grad_out;
  const T* x;
  const A* in_scale;
  const A* in_shift;
  Activation act;
  A* sdyv;
  A* sdyd;  // nullptr: no statistics (nor the three below)
  A* sdydx;
  A* sd;
  A* sdx;

  template <int W>
  using Loaded = GradPacks<T, W>;
  __device__ static A init(int) { return A(0); }
  __device__ static A combine(int, A a, A b) { return a + b; }
  template <int AW>
  __device__ void channel(int64_t nc, A (&cv)[kChan][AW]) const {
    channel_values<AW>(in_scale, nc, cv[0]);
    channel_values<AW>(in_shift, nc, cv[1]);
  }
  template <int W>
  __device__ Loaded<W> load(int64_t off) const {
    return load_grad_packs<W>(grad_out, x, static_cast<const T*>(nullptr), off);
  }
  template <int W, int AW>
  __device__ void fold(int64_t, A (&acc)[kQ][AW], const Loaded<W>& e,
                       const A (&cv)[kChan][AW]) const {
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const int j = AW == 1 ? 0 : i;
      const A dy = to_acc(e.dy.v[i]);
      const A xv = to_acc(e.x.v[i]);
      const A u = cv[0][j] * xv + cv[1][j];
      acc[0][j] += dy * activation(u, act);
      if (sdyd != nullptr) {
        const A d = activation_backward(u, A(1), act);
        acc[1][j] += dy * d;
        acc[2][j] += dy * d * xv;
        acc[3][j] += d;
        acc[4][j] += d * xv;
      }
    }
  }
  __device__ void finalize(int64_t nc, const A (&v)[kQ]) const {
    sdyv[nc] = v[0];
    if (sdyd != nullptr) {
      sdyd[nc] = v[1];
      sdydx[nc] = v[2];
      sd[nc] = v[3];
      sdx[nc] = v[4];
    }
  }
};

// dx = d·(dy_scale·dy + act_shift) + x_scale·x + shift.
template <typename T>
struct ActGradMapOp {
  using A = acc_t<T>;
  static constexpr int kChan = 6;  // in_scale, in_shift, dy_scale, act_shift, x_scale, shift
  const T* grad_out;
  const T* x;
  T* dx;
  const A* in_scale;
  const A* in_shift;
  Activation act;
  const A* dy_scale;
  const A* act_shift;
  const A* x_scale;  // optional
  const A* shift;    // optional

  template <int W>
  struct Loaded {
    Pack<T, W> dy, x;
  };
  template <int AW>
  __device__ void channel(int64_t nc, A (&cv)[kChan][AW]) const {
    channel_values<AW>(in_scale, nc, cv[0]);
    channel_values<AW>(in_shift, nc, cv[1]);
    channel_values<AW>(dy_scale, nc, cv[2]);
    channel_values<AW>(act_shift, nc, cv[3]);
    channel_values<AW>(x_scale, nc, cv[4]);
    channel_values<AW>(shift, nc, cv[5]);
  }
  template <int W>
  __device__ Loaded<W> load(int64_t off) const {
    return Loaded<W>{load_pack<W>(grad_out + off), load_pack<W>(x + off)};
  }
  template <int W, int AW>
  __device__ void store(int64_t off, const Loaded<W>& e, const A (&cv)[kChan][AW]) const {
    Pack<T, W> d;
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const int j = AW == 1 ? 0 : i;
      const A xv = to_acc(e.x.v[i]);
      A v = activation_backward(cv[0][j] * xv + cv[1][j],
                                cv[2][j] * to_acc(e.dy.v[i]) + cv[3][j], act);
      if (x_scale != nullptr) v += cv[4][j] * xv;
      if (shift != nullptr) v += cv[5][j];
      d.v[i] = from_acc<T>(v);
    }
    store_pack<W>(dx + off, d);
  }
};

// The plan of `args`' pass (se_stream_plan.h) on the current device, with the widest
// accesses that its x-sized tensors, starting at `tensors`, allow.
template <typename Args>
StreamPlan plan_pass(const Problem& pb, const Args& args,
                     std::initializer_list<const void*> tensors) {
  int width = 1, sm_count = 1;
  if (pb.N > 0) {  // an empty batch launches nothing: no device to ask
    dispatch_dtype(pb.dtype, [&](auto tag) {
      width = pass_width<decltype(tag)>(pb.channels_last ? pb.C : pb.P, pb.channels_last, tensors);
    });
    sm_count = current_device_info().sm_count;
  }
  return plan_stream_pass(pb, width, sm_count, stream_quantities(args));
}

template <typename T, typename Terms>
void reduce_pass(const StreamPlan& plan, const Terms& terms, void* workspace, cudaStream_t stream) {
  const Problem& pb = plan.problem;
  if (pb.N == 0) return;
  auto* partial = static_cast<acc_t<T>*>(workspace);
  workspace_region("partial", partial, plan.workspace_elems * int64_t(sizeof(acc_t<T>)));
  run_reduce<T>(terms, plan.pass, 0, pb.N, pb.C, pb.P, partial, stream);
}

template <typename T, typename Op>
void map_pass(const StreamPlan& plan, const Op& op, cudaStream_t stream) {
  const Problem& pb = plan.problem;
  if (pb.N > 0) run_map<T>(op, plan.pass, 0, pb.N, pb.C, pb.P, stream);
}

}  // namespace
}  // namespace detail

StreamPlan plan_stream(const Problem& problem, const StreamReduceArgs& args) {
  return detail::plan_pass(problem, args, {args.x});
}

void launch_stream(const StreamPlan& plan, const StreamReduceArgs& args, cudaStream_t stream) {
  detail::dispatch_dtype(plan.problem.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = detail::acc_t<T>;
    const detail::ReduceTerms<T> terms{static_cast<const T*>(args.x), static_cast<A*>(args.sum),
                                       static_cast<A*>(args.sumsq), static_cast<A*>(args.max),
                                       static_cast<A*>(args.min)};
    detail::reduce_pass<T>(plan, terms, args.workspace, stream);
  });
}

StreamPlan plan_stream(const Problem& problem, const StreamMapArgs& args) {
  return detail::plan_pass(problem, args, {args.x, args.residual, args.out});
}

void launch_stream(const StreamPlan& plan, const StreamMapArgs& args, cudaStream_t stream) {
  detail::dispatch_dtype(plan.problem.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = detail::acc_t<T>;
    const auto* x = static_cast<const T*>(args.x);
    const auto* residual = static_cast<const T*>(args.residual);
    auto* out = static_cast<T*>(args.out);
    const auto* scale = static_cast<const A*>(args.scale);
    if (args.shift != nullptr)
      detail::map_pass<T>(plan, detail::ScaleOp<T, true>{x, residual, out, scale, args.relu,
                                                         static_cast<const A*>(args.shift)},
                          stream);
    else
      detail::map_pass<T>(plan, detail::ScaleOp<T>{x, residual, out, scale, args.relu}, stream);
  });
}

StreamPlan plan_stream(const Problem& problem, const StreamGradReduceArgs& args) {
  return detail::plan_pass(problem, args, {args.grad_out, args.out, args.x, args.dresidual});
}

void launch_stream(const StreamPlan& plan, const StreamGradReduceArgs& args,
                   cudaStream_t stream) {
  detail::dispatch_dtype(plan.problem.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = detail::acc_t<T>;
    const detail::GradReduceTerms<T> terms{
        static_cast<const T*>(args.grad_out), static_cast<const T*>(args.out),
        static_cast<const T*>(args.x),        static_cast<const A*>(args.peak),
        static_cast<T*>(args.dresidual),      static_cast<A*>(args.sdy),
        static_cast<A*>(args.sdyx),           static_cast<A*>(args.count)};
    detail::reduce_pass<T>(plan, terms, args.workspace, stream);
  });
}

StreamPlan plan_stream(const Problem& problem, const StreamGradMapArgs& args) {
  return detail::plan_pass(problem, args, {args.grad_out, args.out, args.x, args.dx});
}

void launch_stream(const StreamPlan& plan, const StreamGradMapArgs& args,
                   cudaStream_t stream) {
  detail::dispatch_dtype(plan.problem.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = detail::acc_t<T>;
    const detail::GradMapOp<T> op{
        static_cast<const T*>(args.grad_out), static_cast<const T*>(args.out),
        static_cast<const T*>(args.x),        static_cast<T*>(args.dx),
        static_cast<const A*>(args.dy_scale), static_cast<const A*>(args.x_scale),
        static_cast<const A*>(args.shift),    static_cast<const A*>(args.peak),
        static_cast<const A*>(args.peak_shift)};
    detail::map_pass<T>(plan, op, stream);
  });
}

StreamPlan plan_stream(const Problem& problem, const StreamActReduceArgs& args) {
  return detail::plan_pass(problem, args, {args.x});
}

void launch_stream(const StreamPlan& plan, const StreamActReduceArgs& args, cudaStream_t stream) {
  detail::dispatch_dtype(plan.problem.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = detail::acc_t<T>;
    const detail::ActReduceTerms<T> terms{
        static_cast<const T*>(args.x), static_cast<const A*>(args.in_scale),
        static_cast<const A*>(args.in_shift), args.activation, static_cast<A*>(args.sum)};
    detail::reduce_pass<T>(plan, terms, args.workspace, stream);
  });
}

StreamPlan plan_stream(const Problem& problem, const StreamActMapArgs& args) {
  return detail::plan_pass(problem, args, {args.x, args.out});
}

void launch_stream(const StreamPlan& plan, const StreamActMapArgs& args, cudaStream_t stream) {
  detail::dispatch_dtype(plan.problem.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = detail::acc_t<T>;
    const detail::ActMapOp<T> op{static_cast<const T*>(args.x), static_cast<T*>(args.out),
                                 static_cast<const A*>(args.in_scale),
                                 static_cast<const A*>(args.in_shift), args.activation,
                                 static_cast<const A*>(args.scale)};
    detail::map_pass<T>(plan, op, stream);
  });
}

StreamPlan plan_stream(const Problem& problem, const StreamActGradReduceArgs& args) {
  return detail::plan_pass(problem, args, {args.grad_out, args.x});
}

void launch_stream(const StreamPlan& plan, const StreamActGradReduceArgs& args,
                   cudaStream_t stream) {
  detail::dispatch_dtype(plan.problem.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = detail::acc_t<T>;
    const detail::ActGradReduceTerms<T> terms{
        static_cast<const T*>(args.grad_out), static_cast<const T*>(args.x),
        static_cast<const A*>(args.in_scale), static_cast<const A*>(args.in_shift),
        args.activation,                      static_cast<A*>(args.sdyv),
        static_cast<A*>(args.sdyd),           static_cast<A*>(args.sdydx),
        static_cast<A*>(args.sd),             static_cast<A*>(args.sdx)};
    detail::reduce_pass<T>(plan, terms, args.workspace, stream);
  });
}

StreamPlan plan_stream(const Problem& problem, const StreamActGradMapArgs& args) {
  return detail::plan_pass(problem, args, {args.grad_out, args.x, args.dx});
}

void launch_stream(const StreamPlan& plan, const StreamActGradMapArgs& args,
                   cudaStream_t stream) {
  detail::dispatch_dtype(plan.problem.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = detail::acc_t<T>;
    const detail::ActGradMapOp<T> op{
        static_cast<const T*>(args.grad_out), static_cast<const T*>(args.x),
        static_cast<T*>(args.dx),             static_cast<const A*>(args.in_scale),
        static_cast<const A*>(args.in_shift), args.activation,
        static_cast<const A*>(args.dy_scale), static_cast<const A*>(args.act_shift),
        static_cast<const A*>(args.x_scale),  static_cast<const A*>(args.shift)};
    detail::map_pass<T>(plan, op, stream);
  });
}

}  // namespace se_kernels::cuda
