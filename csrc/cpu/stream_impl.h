// The stream ops' CPU kernels (se_kernels/_stream_ops.py, DESIGN.md §1.4) and the linear
// excitation forms' kernels (se_kernels/_form_ops.py), built from the passes of
// kernels_impl.h; a fully connected layer's products (se_kernels/_fc_ops.py), from the
// MLP's (mlp_impl.h); and this capability's KernelTable. Included, after
// kernels_impl.h, by exactly one source per CPU capability.
//
// Each op is one pass over the whole batch. The reductions run through reduce_spatial, so
// every (n, c) is summed in an order fixed by the shape alone; the maps are element-wise.
#pragma once

#include "kernels_impl.h"

namespace se_kernels::cpu::SE_CPU_CAPABILITY {
namespace {

// fn(std::bool_constant<flag>{}): a run-time flag as a compile-time one.
template <typename F>
void with_flag(bool flag, F&& fn) {
  if (flag)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

// Copies row q of reduce_spatial's [kQ, N, C] result to an [N, C] output.
template <typename acc_t>
void copy_statistic(const at::Tensor& sums, int q, const Geometry& geo, void* dst) {
  const int64_t nc = geo.N * geo.C;
  std::copy_n(sums.const_data_ptr<acc_t>() + q * nc, nc, static_cast<acc_t*>(dst));
}

template <typename scalar_t>
void stream_reduce_typed(const StreamReduceArgs& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto* x = static_cast<const scalar_t*>(p.x);
  with_flag(p.sumsq != nullptr, [&](auto squares) {
    with_flag(p.max != nullptr, [&](auto maxima) {
      with_flag(p.min != nullptr, [&](auto minima) {
        using Terms = PoolTerms<scalar_t, decltype(squares)::value, decltype(maxima)::value,
                                decltype(minima)::value>;
        const at::Tensor sums = reduce_spatial<scalar_t>(p.geo, Terms{x}, acc);
        copy_statistic<acc_t>(sums, 0, p.geo, p.sum);
        if constexpr (decltype(squares)::value)
          copy_statistic<acc_t>(sums, Terms::kSquaresQ, p.geo, p.sumsq);
        if constexpr (decltype(maxima)::value) copy_statistic<acc_t>(sums, Terms::kMaxQ, p.geo, p.max);
        if constexpr (decltype(minima)::value) copy_statistic<acc_t>(sums, Terms::kMinQ, p.geo, p.min);
      });
    });
  });
}

template <typename scalar_t>
void stream_map_typed(const StreamMapArgs& p) {
  using acc_t = at::opmath_type<scalar_t>;
  scale_pass<scalar_t>(p.geo, static_cast<const scalar_t*>(p.x), static_cast<const acc_t*>(p.scale),
                       static_cast<const acc_t*>(p.shift), static_cast<const scalar_t*>(p.residual),
                       static_cast<scalar_t*>(p.out), p.out_relu);
}

template <typename scalar_t>
void stream_grad_reduce_typed(const StreamGradReduceArgs& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  with_flag(p.peak != nullptr, [&](auto count) {
    with_flag(p.sdy != nullptr, [&](auto sum_dy) {
      using Terms = GradTerms<scalar_t, decltype(count)::value, decltype(sum_dy)::value>;
      const Terms terms{{}, static_cast<const scalar_t*>(p.grad_out),
                        static_cast<const scalar_t*>(p.out), static_cast<const scalar_t*>(p.x),
                        static_cast<const acc_t*>(p.peak), static_cast<scalar_t*>(p.dresidual)};
      const at::Tensor sums = reduce_spatial<scalar_t>(p.geo, terms, acc);
      copy_statistic<acc_t>(sums, 0, p.geo, p.sdyx);
      if constexpr (decltype(count)::value) copy_statistic<acc_t>(sums, Terms::kCountQ, p.geo, p.count);
      if constexpr (decltype(sum_dy)::value) copy_statistic<acc_t>(sums, Terms::kSumDyQ, p.geo, p.sdy);
    });
  });
}

template <typename scalar_t>
void stream_grad_map_typed(const StreamGradMapArgs& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const GradInputCoefficients<acc_t> k{
      static_cast<const acc_t*>(p.dy_scale), static_cast<const acc_t*>(p.x_scale),
      static_cast<const acc_t*>(p.shift), static_cast<const acc_t*>(p.peak),
      static_cast<const acc_t*>(p.peak_shift)};
  grad_input_pass<scalar_t>(p.geo, static_cast<const scalar_t*>(p.grad_out),
                            static_cast<const scalar_t*>(p.out), static_cast<const scalar_t*>(p.x),
                            k, static_cast<scalar_t*>(p.dx), nullptr);
}

template <typename scalar_t>
void stream_act_reduce_typed(const StreamActReduceArgs& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const ActTerms<scalar_t> terms{{}, static_cast<const scalar_t*>(p.x),
                                 static_cast<const acc_t*>(p.in_scale),
                                 static_cast<const acc_t*>(p.in_shift), p.activation};
  copy_statistic<acc_t>(reduce_spatial<scalar_t>(p.geo, terms, acc), 0, p.geo, p.sum);
}

template <typename scalar_t>
void stream_act_map_typed(const StreamActMapArgs& p) {
  using acc_t = at::opmath_type<scalar_t>;
  auto vec = [](const void* v) { return static_cast<const acc_t*>(v); };
  act_map_pass<scalar_t>(p.geo, p.activation, static_cast<const scalar_t*>(p.grad_out),
                         static_cast<const scalar_t*>(p.x),
                         {vec(p.in_scale), vec(p.in_shift), vec(p.scale), vec(p.act_shift),
                          vec(p.x_scale), vec(p.shift)},
                         static_cast<scalar_t*>(p.out));
}

template <typename scalar_t>
void stream_act_grad_reduce_typed(const StreamActGradReduceArgs& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  with_flag(p.sdyd != nullptr, [&](auto statistics) {
    using Terms = ActGradTerms<scalar_t, decltype(statistics)::value>;
    const Terms terms{{}, static_cast<const scalar_t*>(p.grad_out),
                      static_cast<const scalar_t*>(p.x), static_cast<const acc_t*>(p.in_scale),
                      static_cast<const acc_t*>(p.in_shift), p.activation};
    const at::Tensor sums = reduce_spatial<scalar_t>(p.geo, terms, acc);
    copy_statistic<acc_t>(sums, 0, p.geo, p.sdyv);
    if constexpr (decltype(statistics)::value) {
      copy_statistic<acc_t>(sums, Terms::kDyD, p.geo, p.sdyd);
      copy_statistic<acc_t>(sums, Terms::kDyDX, p.geo, p.sdydx);
      copy_statistic<acc_t>(sums, Terms::kD, p.geo, p.sd);
      copy_statistic<acc_t>(sums, Terms::kDX, p.geo, p.sdx);
    }
  });
}

// g[n, c] = b + sum_{i < k} w[i] * z~[n, c + i - (k - 1) / 2], z~ zero outside [0, C) or,
// circular, z[n, (c + i - (k - 1) / 2) mod C] (the index wraps as often as k needs).
template <typename acc_t>
void channel_conv(const acc_t* z, int64_t N, int64_t C, const acc_t* w, int64_t k, const acc_t* b,
                  bool circular, acc_t* g) {
  const int64_t pad = (k - 1) / 2;
  for (int64_t n = 0; n < N; ++n) {
    const acc_t* zn = z + n * C;
    for (int64_t c = 0; c < C; ++c) {
      acc_t v = 0;
      for (int64_t i = 0; i < k; ++i) {
        int64_t j = c + i - pad;
        if (circular) {
          j = ((j % C) + C) % C;
        } else if (j < 0 || j >= C) {
          continue;
        }
        v += w[i] * zn[j];
      }
      g[n * C + c] = b ? v + b[0] : v;
    }
  }
}

// The transpose of channel_conv: dz[n, j] = sum of dg[n, c] * w[i] over the (c, i) that read
// z[n, j]; dw[i] (+)= sum_{n, c} dg[n, c] * z~[n, c + i - (k - 1) / 2] and db (+)= sum dg
// (when db is given), in a fixed order.
template <typename acc_t>
void channel_conv_backward(const acc_t* dg, const acc_t* z, int64_t N, int64_t C, const acc_t* w,
                           int64_t k, bool circular, acc_t* dz, acc_t* dw, acc_t* db,
                           bool accumulate) {
  const int64_t pad = (k - 1) / 2;
  std::fill_n(dz, N * C, acc_t(0));
  if (!accumulate) {
    std::fill_n(dw, k, acc_t(0));
    if (db) db[0] = 0;
  }
  for (int64_t n = 0; n < N; ++n) {
    const acc_t* dgn = dg + n * C;
    const acc_t* zn = z + n * C;
    acc_t* dzn = dz + n * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = dgn[c];
      if (db) db[0] += d;
      for (int64_t i = 0; i < k; ++i) {
        int64_t j = c + i - pad;
        if (circular) {
          j = ((j % C) + C) % C;
        } else if (j < 0 || j >= C) {
          continue;
        }
        dzn[j] += w[i] * d;
        dw[i] += d * zn[j];
      }
    }
  }
}

// The linear forms' inference on one group of samples: squeeze, g from z, s = gate(g), and
// out = out_act(s * x + residual), the group's x re-read from cache.
template <typename scalar_t>
void linear_form_typed(const LinearFormArgs& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = Mlp<acc_t>;
  const Geometry& geo = p.geo;
  const int64_t N = geo.N, C = geo.C;
  const auto* x = static_cast<const scalar_t*>(p.x);
  auto* z = static_cast<acc_t*>(p.z);
  auto* g = static_cast<acc_t*>(p.g);
  const auto* w = static_cast<const acc_t*>(p.weight);
  const auto* b = static_cast<const acc_t*>(p.bias);
  squeeze<scalar_t>(geo, p.opt.pool, x, z, static_cast<acc_t*>(p.zmax));
  switch (p.form) {
    case LinearForm::Fc:
      M::dot_rows(z, N, w, C, C, b, g);
      break;
    case LinearForm::Conv:
      channel_conv(z, N, C, w, p.kernel, b, false, g);
      break;
    case LinearForm::CircularConv:
      channel_conv(z, N, C, w, p.kernel, b, true, g);
      break;
  }
  std::vector<acc_t> s(N * C);
  M::gate(p.opt.gate, N * C, g, s.data(), nullptr, nullptr);
  scale_pass<scalar_t>(geo, x, s.data(), nullptr, static_cast<const scalar_t*>(p.residual),
                       static_cast<scalar_t*>(p.out), p.opt.out_relu());
}

// The linear forms' backward on one group of samples: backward_through with the form's
// transpose for the excitation.
template <typename scalar_t>
void linear_form_backward_typed(const LinearFormGradArgs& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = Mlp<acc_t>;
  const int64_t N = p.geo.N, C = p.geo.C;
  const auto* w = static_cast<const acc_t*>(p.weight);
  const auto* z = static_cast<const acc_t*>(p.z);
  auto* dw = static_cast<acc_t*>(p.dweight);
  auto* db = static_cast<acc_t*>(p.dbias);
  auto excite = [&](const acc_t* ds, acc_t* s, acc_t* dz) {
    std::vector<acc_t> dg(N * C);
    M::gate(p.opt.gate, N * C, static_cast<const acc_t*>(p.g), s, ds, dg.data());
    switch (p.form) {
      case LinearForm::Fc:  // g = W z + b
        M::sum_rows(dg.data(), 1, C, C, N, z, C, dw, p.accumulate);  // dW [C, C] = dg^T z
        if (db) M::column_sums(dg.data(), N, C, db, p.accumulate);
        M::sum_rows(dg.data(), C, 1, N, C, w, C, dz, false);          // dz [N, C] = dg W
        break;
      case LinearForm::Conv:
        channel_conv_backward(dg.data(), z, N, C, w, p.kernel, false, dz, dw, db, p.accumulate);
        break;
      case LinearForm::CircularConv:
        channel_conv_backward(dg.data(), z, N, C, w, p.kernel, true, dz, dw, db, p.accumulate);
        break;
    }
  };
  backward_through<scalar_t>(p.geo, p.opt.pool, static_cast<const scalar_t*>(p.grad_out),
                             static_cast<const scalar_t*>(p.out), static_cast<const scalar_t*>(p.x),
                             static_cast<const acc_t*>(p.zmax), static_cast<scalar_t*>(p.dx),
                             static_cast<scalar_t*>(p.dresidual), excite);
}

void linear_form_backward(const LinearFormGradArgs& p) {
  dispatch_dtype(p.dtype, [&](auto t) { linear_form_backward_typed<decltype(t)>(p); });
}

void linear_form(const LinearFormArgs& p) {
  dispatch_dtype(p.dtype, [&](auto t) { linear_form_typed<decltype(t)>(p); });
}

void stream_reduce(const StreamReduceArgs& p) {
  dispatch_dtype(p.dtype, [&](auto t) { stream_reduce_typed<decltype(t)>(p); });
}

void stream_map(const StreamMapArgs& p) {
  dispatch_dtype(p.dtype, [&](auto t) { stream_map_typed<decltype(t)>(p); });
}

void stream_grad_reduce(const StreamGradReduceArgs& p) {
  dispatch_dtype(p.dtype, [&](auto t) { stream_grad_reduce_typed<decltype(t)>(p); });
}

void stream_grad_map(const StreamGradMapArgs& p) {
  dispatch_dtype(p.dtype, [&](auto t) { stream_grad_map_typed<decltype(t)>(p); });
}

void stream_act_reduce(const StreamActReduceArgs& p) {
  dispatch_dtype(p.dtype, [&](auto t) { stream_act_reduce_typed<decltype(t)>(p); });
}

void stream_act_map(const StreamActMapArgs& p) {
  dispatch_dtype(p.dtype, [&](auto t) { stream_act_map_typed<decltype(t)>(p); });
}

void stream_act_grad_reduce(const StreamActGradReduceArgs& p) {
  dispatch_dtype(p.dtype, [&](auto t) { stream_act_grad_reduce_typed<decltype(t)>(p); });
}

// fn(acc_t{}) for the accumulation dtype `dtype` (float or double; prepare_fc_layer checked).
template <typename F>
void dispatch_accumulate(c10::ScalarType dtype, F&& fn) {
  if (dtype == at::kDouble)
    fn(double{});
  else
    fn(float{});
}

void fc_layer(const FcLayerArgs& p) {
  const FcLayerOperands& in = p.in;
  dispatch_accumulate(in.dtype, [&](auto t) {
    using acc_t = decltype(t);
    Mlp<acc_t>::dot_rows(static_cast<const acc_t*>(in.x), in.N,
                         static_cast<const acc_t*>(in.weight), in.R, in.K,
                         static_cast<const acc_t*>(p.bias), static_cast<acc_t*>(p.y));
  });
}

void fc_layer_backward(const FcLayerGradArgs& p) {
  const FcLayerOperands& in = p.in;
  dispatch_accumulate(in.dtype, [&](auto t) {
    using acc_t = decltype(t);
    const auto* grad = static_cast<const acc_t*>(p.grad);
    // dx = grad weight; dweight = grad^T x, grad read transposed (u(r, n) = grad[n * R + r]).
    Mlp<acc_t>::sum_rows(grad, in.R, 1, in.N, in.R, static_cast<const acc_t*>(in.weight), in.K,
                         static_cast<acc_t*>(p.dx), false);
    Mlp<acc_t>::sum_rows(grad, 1, in.R, in.R, in.N, static_cast<const acc_t*>(in.x), in.K,
                         static_cast<acc_t*>(p.dweight), false);
    if (p.dbias) Mlp<acc_t>::column_sums(grad, in.N, in.R, static_cast<acc_t*>(p.dbias), false);
  });
}

}  // namespace

extern const KernelTable kKernels = {&forward, &backward, &stream_reduce, &stream_map,
                                     &stream_grad_reduce, &stream_grad_map, &linear_form,
                                     &linear_form_backward, &stream_act_reduce,
                                     &stream_act_map, &stream_act_grad_reduce, &fc_layer,
                                     &fc_layer_backward};

}  // namespace se_kernels::cpu::SE_CPU_CAPABILITY
