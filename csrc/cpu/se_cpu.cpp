// Fused SE kernels for CPU tensors.
//
// Forward:  one pass pools x, the MLP runs on the [N, C] pooled vectors, one pass writes
//           out = out_act(s * x + residual).
// Backward: one pass reduces ds = sum_p dy * x (and counts the max positions), the MLP
//           backward runs on [N, C] vectors, one pass writes dx (and the residual's grad).
// Every pass reads its inputs in their own layout (NCHW or channels-last), accumulates in
// fp32 (fp64 for fp64), and splits work so that results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../se_common.h"

namespace se_kernels {
namespace {

using at::vec::Vectorized;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Loads and stores kWidth scalars as two vectors of the accumulation type, so fp16/bf16
// are widened once per load and each pass below is written once for every dtype.
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = 2 * Vec::size();
  static_assert(std::is_same_v<scalar_t, acc_t> || Vectorized<scalar_t>::size() == kWidth);

  static void load(const scalar_t* p, Vec& lo, Vec& hi) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      lo = Vec::loadu(p);
      hi = Vec::loadu(p + Vec::size());
    } else {
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    }
  }
  static void store(scalar_t* p, const Vec& lo, const Vec& hi) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      lo.store(p);
      hi.store(p + Vec::size());
    } else {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
    }
  }
};

// A per-channel [N, C] value as seen from a span of x: an NCHW row holds one channel (the
// value is broadcast); a channels-last row walks consecutive channels (the value is loaded).
template <typename acc_t, bool kPerLane>
struct ChannelValue {
  using Vec = Vectorized<acc_t>;
  const acc_t* p = nullptr;  // at the span's first channel; nullptr when a pass has no use for it

  explicit operator bool() const { return p != nullptr; }
  Vec lo(int64_t i) const { return kPerLane ? Vec::loadu(p + i) : Vec(p[0]); }
  Vec hi(int64_t i) const { return kPerLane ? Vec::loadu(p + i + Vec::size()) : Vec(p[0]); }
  acc_t at(int64_t i) const { return kPerLane ? p[i] : p[0]; }
};

template <typename acc_t>
acc_t nan_max(acc_t a, acc_t b) {  // torch.amax propagates NaN
  return (a > b || std::isnan(a)) ? a : b;
}

// Calls fn(per_lane_tag, offset, length, channel_offset) for every dense span of x, in
// parallel. channel_offset indexes [N, C] vectors at the span's first element.
template <typename F>
void for_each_span(const Geometry& geo, F&& fn) {
  constexpr int64_t kGrainElements = 16384;
  if (!geo.channels_last) {
    at::parallel_for(0, geo.N * geo.C, std::max<int64_t>(1, kGrainElements / geo.P),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r)
                         fn(std::false_type{}, r * geo.P, geo.P, r);
                     });
  } else {
    at::parallel_for(0, geo.N * geo.P, std::max<int64_t>(1, kGrainElements / geo.C),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r)
                         fn(std::true_type{}, r * geo.C, geo.C, (r / geo.P) * geo.C);
                     });
  }
}

// Reduces Terms over the spatial positions of every (n, c), returning [Terms::kQ, N, C].
//
// Work items are (rows or channel blocks) x spatial pieces; pieces are combined in a fixed
// order afterwards. The number of pieces depends only on the shape, so the result is the
// same for any number of threads, and small batches still spread over every thread.
template <typename scalar_t, typename Terms>
at::Tensor reduce_spatial(const Geometry& geo, const Terms& terms, const at::TensorOptions& acc) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  constexpr int kQ = Terms::kQ;
  constexpr int64_t kWidth = L::kWidth;
  constexpr int64_t kMinItems = 64;         // enough to feed any CPU we expect
  constexpr int64_t kMinPieceElems = 2048;  // below this a piece costs more than it saves
  constexpr int64_t kBlockC = 128;          // channels per channels-last item (acc in L1)

  const int64_t N = geo.N, C = geo.C, P = geo.P;
  const int64_t blocks = geo.channels_last ? ceil_div(C, kBlockC) : C;
  const int64_t elems_per_pixel = geo.channels_last ? std::min(C, kBlockC) : 1;
  const int64_t pieces =
      std::clamp(ceil_div(kMinItems, std::max<int64_t>(1, N * blocks)), int64_t{1},
                 std::max<int64_t>(1, P * elems_per_pixel / kMinPieceElems));
  const int64_t piece_len = ceil_div(P, pieces);

  // partial[q][n][c][piece]
  auto partial = at::empty({kQ, N, C, pieces}, acc);
  acc_t* part = partial.data_ptr<acc_t>();
  auto part_at = [&](int q, int64_t n, int64_t c, int64_t k) -> acc_t& {
    return part[((q * N + n) * C + c) * pieces + k];
  };

  const int64_t items = N * blocks * pieces;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, piece_len * elems_per_pixel));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item % pieces;
      const int64_t nb = item / pieces;
      const int64_t n = nb / blocks, b = nb % blocks;
      const int64_t p0 = k * piece_len, p1 = std::min(P, p0 + piece_len);
      if (!geo.channels_last) {
        // One NCHW row: vector lanes accumulate, then fold into one value per quantity.
        const int64_t c = b, base = (n * C + c) * P;
        Vec acc[kQ][2];
        for (int q = 0; q < kQ; ++q) acc[q][0] = acc[q][1] = Vec(Terms::init(q));
        int64_t p = p0;
        for (; p + kWidth <= p1; p += kWidth)
          terms.template fold<false>(acc, base + p, n * C + c);
        acc_t lane[kQ][kWidth];
        for (int q = 0; q < kQ; ++q) {
          acc[q][0].store(lane[q]);
          acc[q][1].store(lane[q] + Vec::size());
        }
        acc_t total[kQ];
        for (int q = 0; q < kQ; ++q) {
          total[q] = Terms::init(q);
          for (int64_t i = 0; i < kWidth; ++i) total[q] = Terms::combine(q, total[q], lane[q][i]);
        }
        for (; p < p1; ++p) terms.fold_scalar(total, base + p, n * C + c);
        for (int q = 0; q < kQ; ++q) part_at(q, n, c, k) = total[q];
      } else {
        // A channels-last block: per-channel accumulators, walked pixel by pixel.
        const int64_t c0 = b * kBlockC, c1 = std::min(C, c0 + kBlockC), width = c1 - c0;
        acc_t total[kQ][kBlockC];
        for (int q = 0; q < kQ; ++q) std::fill_n(total[q], width, Terms::init(q));
        const int64_t vec_width = width - width % kWidth;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t base = (n * P + p) * C + c0;
          for (int64_t i = 0; i < vec_width; i += kWidth) {
            Vec acc[kQ][2];
            for (int q = 0; q < kQ; ++q) {
              acc[q][0] = Vec::loadu(total[q] + i);
              acc[q][1] = Vec::loadu(total[q] + i + Vec::size());
            }
            terms.template fold<true>(acc, base + i, n * C + c0 + i);
            for (int q = 0; q < kQ; ++q) {
              acc[q][0].store(total[q] + i);
              acc[q][1].store(total[q] + i + Vec::size());
            }
          }
          for (int64_t i = vec_width; i < width; ++i) {
            acc_t one[kQ];
            for (int q = 0; q < kQ; ++q) one[q] = total[q][i];
            terms.fold_scalar(one, base + i, n * C + c0 + i);
            for (int q = 0; q < kQ; ++q) total[q][i] = one[q];
          }
        }
        for (int q = 0; q < kQ; ++q)
          for (int64_t i = 0; i < width; ++i) part_at(q, n, c0 + i, k) = total[q][i];
      }
    }
  });
  if (pieces == 1) return partial.view({kQ, N, C});

  auto result = at::empty({kQ, N, C}, acc);
  acc_t* res = result.data_ptr<acc_t>();
  at::parallel_for(0, N * C, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc)
      for (int q = 0; q < kQ; ++q) {
        acc_t v = Terms::init(q);
        for (int64_t k = 0; k < pieces; ++k) v = Terms::combine(q, v, part[(q * N * C + nc) * pieces + k]);
        res[q * N * C + nc] = v;
      }
  });
  return result;
}

// Terms folded by reduce_spatial. fold<kPerLane> takes kWidth elements of x at `off`, whose
// channel is `chan` (NCHW: one channel for all lanes) or starts at `chan` (channels-last).

// Forward pooling: [0] = sum of x, [1] = max of x.
template <typename scalar_t>
struct PoolTerms {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  static constexpr int kQ = 2;
  const scalar_t* x;

  static acc_t init(int q) { return q == 0 ? acc_t(0) : -std::numeric_limits<acc_t>::infinity(); }
  static acc_t combine(int q, acc_t a, acc_t b) { return q == 0 ? a + b : nan_max(a, b); }

  template <bool kPerLane>
  void fold(Vec (&acc)[kQ][2], int64_t off, int64_t /*chan*/) const {
    Vec v[2];
    L::load(x + off, v[0], v[1]);
    for (int h = 0; h < 2; ++h) {
      acc[0][h] = acc[0][h] + v[h];
      acc[1][h] = at::vec::maximum(acc[1][h], v[h]);
    }
  }
  void fold_scalar(acc_t (&acc)[kQ], int64_t off, int64_t /*chan*/) const {
    const acc_t v = static_cast<acc_t>(x[off]);
    acc[0] += v;
    acc[1] = nan_max(acc[1], v);
  }
};

// Backward reduction: [0] = ds = sum of dy * x, [1] = how many x equal the channel's max.
// dy = grad_out, masked by out > 0 when the output went through a ReLU.
template <typename scalar_t>
struct GradTerms {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  static constexpr int kQ = 2;
  const scalar_t* grad_out;
  const scalar_t* out;  // nullptr: no output ReLU
  const scalar_t* x;
  const acc_t* zmax;    // nullptr: avg pooling, nothing to count

  static acc_t init(int) { return acc_t(0); }
  static acc_t combine(int, acc_t a, acc_t b) { return a + b; }

  template <bool kPerLane>
  void fold(Vec (&acc)[kQ][2], int64_t off, int64_t chan) const {
    Vec dy[2], xv[2];
    L::load(grad_out + off, dy[0], dy[1]);
    L::load(x + off, xv[0], xv[1]);
    if (out) {
      Vec o[2];
      L::load(out + off, o[0], o[1]);
      for (int h = 0; h < 2; ++h) dy[h] = Vec::blendv(Vec(0), dy[h], o[h] > Vec(0));
    }
    for (int h = 0; h < 2; ++h) acc[0][h] = at::vec::fmadd(dy[h], xv[h], acc[0][h]);
    if (zmax) {
      const ChannelValue<acc_t, kPerLane> m{zmax + chan};
      acc[1][0] = acc[1][0] + Vec::blendv(Vec(0), Vec(1), xv[0] == m.lo(0));
      acc[1][1] = acc[1][1] + Vec::blendv(Vec(0), Vec(1), xv[1] == m.hi(0));
    }
  }
  void fold_scalar(acc_t (&acc)[kQ], int64_t off, int64_t chan) const {
    acc_t dy = static_cast<acc_t>(grad_out[off]);
    if (out && !(static_cast<acc_t>(out[off]) > 0)) dy = 0;
    const acc_t xv = static_cast<acc_t>(x[off]);
    acc[0] += dy * xv;
    if (zmax && xv == zmax[chan]) acc[1] += 1;
  }
};

// out = out_act(s * x + residual) over one span.
template <typename scalar_t, bool kPerLane>
void scale_span(const scalar_t* x, const scalar_t* residual, scalar_t* out, int64_t len,
                ChannelValue<at::opmath_type<scalar_t>, kPerLane> s, bool relu) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  int64_t i = 0;
  for (; i + L::kWidth <= len; i += L::kWidth) {
    Vec y[2];
    L::load(x + i, y[0], y[1]);
    y[0] = y[0] * s.lo(i);
    y[1] = y[1] * s.hi(i);
    if (residual) {
      Vec r[2];
      L::load(residual + i, r[0], r[1]);
      y[0] = y[0] + r[0];
      y[1] = y[1] + r[1];
    }
    if (relu) {  // maximum() keeps NaN, as torch.relu does
      y[0] = at::vec::maximum(y[0], Vec(0));
      y[1] = at::vec::maximum(y[1], Vec(0));
    }
    L::store(out + i, y[0], y[1]);
  }
  for (; i < len; ++i) {
    acc_t y = static_cast<acc_t>(x[i]) * s.at(i);
    if (residual) y += static_cast<acc_t>(residual[i]);
    if (relu && y < 0) y = 0;
    out[i] = static_cast<scalar_t>(y);
  }
}

// dx = dy * s + dx_avg + [x == zmax] * dx_max, and dresidual = dy, over one span.
template <typename scalar_t, bool kPerLane>
struct GradInputSpan {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  using Chan = ChannelValue<acc_t, kPerLane>;
  const scalar_t* grad_out;
  const scalar_t* out;  // nullptr: no output ReLU
  const scalar_t* x;    // read only for max pooling
  scalar_t* dx;
  scalar_t* dresidual;  // nullptr: not wanted
  Chan s, dx_avg, zmax, dx_max;

  void operator()(int64_t len) const {
    int64_t i = 0;
    for (; i + L::kWidth <= len; i += L::kWidth) {
      Vec dy[2], res[2];
      L::load(grad_out + i, dy[0], dy[1]);
      if (out) {
        Vec o[2];
        L::load(out + i, o[0], o[1]);
        for (int h = 0; h < 2; ++h) dy[h] = Vec::blendv(Vec(0), dy[h], o[h] > Vec(0));
      }
      res[0] = dy[0] * s.lo(i);
      res[1] = dy[1] * s.hi(i);
      if (dx_avg) {
        res[0] = res[0] + dx_avg.lo(i);
        res[1] = res[1] + dx_avg.hi(i);
      }
      if (dx_max) {
        Vec xv[2];
        L::load(x + i, xv[0], xv[1]);
        res[0] = res[0] + Vec::blendv(Vec(0), dx_max.lo(i), xv[0] == zmax.lo(i));
        res[1] = res[1] + Vec::blendv(Vec(0), dx_max.hi(i), xv[1] == zmax.hi(i));
      }
      L::store(dx + i, res[0], res[1]);
      if (dresidual) L::store(dresidual + i, dy[0], dy[1]);
    }
    for (; i < len; ++i) {
      acc_t dy = static_cast<acc_t>(grad_out[i]);
      if (out && !(static_cast<acc_t>(out[i]) > 0)) dy = 0;
      acc_t v = dy * s.at(i);
      if (dx_avg) v += dx_avg.at(i);
      if (dx_max && static_cast<acc_t>(x[i]) == zmax.at(i)) v += dx_max.at(i);
      dx[i] = static_cast<scalar_t>(v);
      if (dresidual) dresidual[i] = static_cast<scalar_t>(dy);
    }
  }
};

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

ForwardResult se_forward_cpu(const at::Tensor& x_in, const at::Tensor& w1,
                             const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                             const std::optional<at::Tensor>& b2,
                             const std::optional<at::Tensor>& residual_in,
                             c10::string_view activation, c10::string_view gate,
                             c10::string_view pool, c10::string_view out_activation) {
  const Options opt = parse_options(activation, gate, pool, out_activation);
  check_forward_args(x_in, w1, b1, w2, b2, residual_in);
  const Geometry geo = geometry_of(x_in);
  const auto fmt = geo.memory_format();
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor residual = residual_in ? residual_in->contiguous(fmt) : at::Tensor();
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));

  at::Tensor z, zmax = at::empty({0}, acc);
  at::Tensor s;
  Excitation ex;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "se_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor sums = reduce_spatial<scalar_t>(geo, PoolTerms<scalar_t>{x.const_data_ptr<scalar_t>()}, acc);
    const at::Tensor avg = sums[0] / static_cast<double>(geo.P);
    switch (opt.pool) {
      case Pool::Avg: z = avg; break;
      // zmax is a fresh tensor: op outputs must not alias each other or scratch buffers.
      case Pool::Max: zmax = sums[1].clone(); z = zmax.clone(); break;
      case Pool::AvgMax: zmax = sums[1].clone(); z = avg * 0.5 + zmax * 0.5; break;
    }
    ex = excite_forward(z, w1, b1, w2, b2, opt);
    const acc_t* s_ptr = ex.s.const_data_ptr<acc_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = data_or_null<scalar_t>(residual);
    scalar_t* o_ptr = out.data_ptr<scalar_t>();
    for_each_span(geo, [&](auto per_lane, int64_t off, int64_t len, int64_t chan) {
      constexpr bool kPerLane = decltype(per_lane)::value;
      scale_span<scalar_t, kPerLane>(x_ptr + off, r_ptr ? r_ptr + off : nullptr, o_ptr + off, len,
                                     ChannelValue<acc_t, kPerLane>{s_ptr + chan}, opt.out_relu());
    });
  });
  return {out, z, zmax, ex.a, ex.g};
}

BackwardResult se_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                               const std::optional<at::Tensor>& out_in, const at::Tensor& w1,
                               const at::Tensor& w2, const at::Tensor& z, const at::Tensor& zmax,
                               const at::Tensor& a, const at::Tensor& g,
                               c10::string_view activation, c10::string_view gate,
                               c10::string_view pool, c10::string_view out_activation,
                               bool residual_grad) {
  const Options opt = parse_options(activation, gate, pool, out_activation);
  check_backward_args(grad_out_in, x_in, out_in, w1, w2, z, zmax, a, g, opt);
  const Geometry geo = geometry_of(x_in);
  const auto fmt = geo.memory_format();
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor grad_out = grad_out_in.contiguous(fmt);
  const at::Tensor out = opt.out_relu() ? out_in->contiguous(fmt) : at::Tensor();
  const at::Tensor zmax_c = opt.uses_max() ? zmax.contiguous() : at::Tensor();
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor dresidual = opt.out_relu() && residual_grad
                             ? at::empty(x.sizes(), x.options().memory_format(fmt))
                             : at::empty({0}, x.options());

  ExcitationGrads eg;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "se_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradTerms<scalar_t> terms{grad_out.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(out),
                                    x.const_data_ptr<scalar_t>(), data_or_null<acc_t>(zmax_c)};
    const at::Tensor sums = reduce_spatial<scalar_t>(geo, terms, acc);
    eg = excite_backward(sums[0], sums[1], z, a, g, w1, w2, geo.P, opt);
    const at::Tensor dx_avg = eg.dx_avg.defined() ? eg.dx_avg.contiguous() : at::Tensor();
    const at::Tensor dx_max = eg.dx_max.defined() ? eg.dx_max.contiguous() : at::Tensor();
    const acc_t* s_ptr = eg.s.const_data_ptr<acc_t>();
    const acc_t* avg_ptr = data_or_null<acc_t>(dx_avg);
    const acc_t* max_ptr = data_or_null<acc_t>(dx_max);
    const acc_t* zmax_ptr = data_or_null<acc_t>(zmax_c);
    scalar_t* dx_ptr = dx.data_ptr<scalar_t>();
    scalar_t* dres_ptr = dresidual.numel() ? dresidual.data_ptr<scalar_t>() : nullptr;
    for_each_span(geo, [&](auto per_lane, int64_t off, int64_t len, int64_t chan) {
      constexpr bool kPerLane = decltype(per_lane)::value;
      using Chan = ChannelValue<acc_t, kPerLane>;
      auto at_chan = [&](const acc_t* p) { return Chan{p ? p + chan : nullptr}; };
      GradInputSpan<scalar_t, kPerLane>{
          terms.grad_out + off, terms.out ? terms.out + off : nullptr, terms.x + off,
          dx_ptr + off, dres_ptr ? dres_ptr + off : nullptr,
          at_chan(s_ptr), at_chan(avg_ptr), at_chan(zmax_ptr), at_chan(max_ptr)}(len);
    });
  });
  return {dx, eg.dw1, eg.db1, eg.dw2, eg.db2, dresidual};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CPU, m) {
  m.impl("se_forward", &se_forward_cpu);
  m.impl("se_backward", &se_backward_cpu);
}

}  // namespace se_kernels
