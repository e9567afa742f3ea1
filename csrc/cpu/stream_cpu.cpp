// The stream ops (se_kernels/_stream_ops.py, DESIGN.md §1.4) on CPU tensors: the arguments
// checked, inputs made dense and outputs allocated by se_common's prepare_stream_*, then
// one call of the kernels (stream_impl.h) per op.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../se_common.h"
#include "kernels.h"

namespace se_kernels {

namespace {

using VectorList = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A prepared tensor's data, or nullptr where it is absent or an unwanted [0] output.
const void* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() ? t.const_data_ptr() : nullptr;
}
void* data_or_null(at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr() : nullptr; }

VectorList stream_reduce_cpu(const at::Tensor& x, bool squares, bool maxima, bool minima) {
  StreamReduceTensors t = prepare_stream_reduce(x, squares, maxima, minima);
  if (t.geo.N > 0) {
    cpu::kernels().stream_reduce({t.geo, x.scalar_type(), t.x.const_data_ptr(), t.sum.data_ptr(),
                                  data_or_null(t.sumsq), data_or_null(t.max),
                                  data_or_null(t.min)});
  }
  return {t.sum, t.sumsq, t.max, t.min};
}

at::Tensor stream_map_cpu(const at::Tensor& x, const at::Tensor& scale,
                          const std::optional<at::Tensor>& shift,
                          const std::optional<at::Tensor>& residual,
                          c10::string_view out_activation) {
  StreamMapTensors t = prepare_stream_map(x, scale, shift, residual, out_activation);
  if (t.geo.N > 0) {
    cpu::kernels().stream_map({t.geo, x.scalar_type(), t.x.const_data_ptr(),
                               t.scale.const_data_ptr(), data_or_null(t.shift),
                               data_or_null(t.residual), t.out.data_ptr(), t.relu});
  }
  return t.out;
}

VectorList stream_grad_reduce_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                                  const at::Tensor& x, const std::optional<at::Tensor>& peak,
                                  c10::string_view out_activation, bool sum_dy,
                                  bool residual_grad) {
  StreamGradReduceTensors t =
      prepare_stream_grad_reduce(grad_out, out, x, peak, out_activation, sum_dy, residual_grad);
  if (t.geo.N > 0) {
    cpu::kernels().stream_grad_reduce({t.geo, x.scalar_type(), t.grad_out.const_data_ptr(),
                                       data_or_null(t.out), t.x.const_data_ptr(),
                                       data_or_null(t.peak), data_or_null(t.sdy),
                                       t.sdyx.data_ptr(), data_or_null(t.count),
                                       data_or_null(t.dresidual)});
  }
  return {t.sdy, t.sdyx, t.count, t.dresidual};
}

at::Tensor stream_grad_map_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                               const at::Tensor& x, const at::Tensor& dy_scale,
                               const std::optional<at::Tensor>& x_scale,
                               const std::optional<at::Tensor>& shift,
                               const std::optional<at::Tensor>& peak,
                               const std::optional<at::Tensor>& peak_shift,
                               c10::string_view out_activation) {
  StreamGradMapTensors t = prepare_stream_grad_map(grad_out, out, x, dy_scale, x_scale, shift,
                                                   peak, peak_shift, out_activation);
  if (t.geo.N > 0) {
    cpu::kernels().stream_grad_map({t.geo, x.scalar_type(), t.grad_out.const_data_ptr(),
                                    data_or_null(t.out), t.x.const_data_ptr(),
                                    t.dy_scale.const_data_ptr(), data_or_null(t.x_scale),
                                    data_or_null(t.shift), data_or_null(t.peak),
                                    data_or_null(t.peak_shift), t.dx.data_ptr()});
  }
  return t.dx;
}

// The act tail's ops (DESIGN.md §1.5).
at::Tensor stream_act_reduce_cpu(const at::Tensor& x, const at::Tensor& in_scale,
                                 const at::Tensor& in_shift, c10::string_view activation) {
  StreamActTensors t = prepare_stream_act_reduce(x, in_scale, in_shift, activation);
  if (t.geo.N > 0) {
    cpu::kernels().stream_act_reduce({t.geo, x.scalar_type(), t.activation, t.x.const_data_ptr(),
                                      t.in_scale.const_data_ptr(), t.in_shift.const_data_ptr(),
                                      t.sum.data_ptr()});
  }
  return t.sum;
}

// Both maps: the forward's (no grad_out) and the backward's.
void run_act_map(StreamActTensors& t, c10::ScalarType dtype) {
  if (t.geo.N == 0) return;
  cpu::kernels().stream_act_map({t.geo, dtype, t.activation, data_or_null(t.grad_out),
                                 t.x.const_data_ptr(), t.in_scale.const_data_ptr(),
                                 t.in_shift.const_data_ptr(), t.scale.const_data_ptr(),
                                 data_or_null(t.act_shift), data_or_null(t.x_scale),
                                 data_or_null(t.shift), t.out.data_ptr()});
}

at::Tensor stream_act_map_cpu(const at::Tensor& x, const at::Tensor& in_scale,
                              const at::Tensor& in_shift, c10::string_view activation,
                              const at::Tensor& scale) {
  StreamActTensors t = prepare_stream_act_map(x, in_scale, in_shift, activation, scale);
  run_act_map(t, x.scalar_type());
  return t.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_act_grad_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& in_scale,
    const at::Tensor& in_shift, c10::string_view activation, bool statistics) {
  StreamActTensors t =
      prepare_stream_act_grad_reduce(grad_out, x, in_scale, in_shift, activation, statistics);
  if (t.geo.N > 0) {
    cpu::kernels().stream_act_grad_reduce(
        {t.geo, x.scalar_type(), t.activation, t.grad_out.const_data_ptr(), t.x.const_data_ptr(),
         t.in_scale.const_data_ptr(), t.in_shift.const_data_ptr(), t.sdyv.data_ptr(),
         data_or_null(t.sdyd), data_or_null(t.sdydx), data_or_null(t.sd), data_or_null(t.sdx)});
  }
  return {t.sdyv, t.sdyd, t.sdydx, t.sd, t.sdx};
}

at::Tensor stream_act_grad_map_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& in_scale, const at::Tensor& in_shift,
                                   c10::string_view activation, const at::Tensor& dy_scale,
                                   const at::Tensor& act_shift,
                                   const std::optional<at::Tensor>& x_scale,
                                   const std::optional<at::Tensor>& shift) {
  StreamActTensors t = prepare_stream_act_grad_map(grad_out, x, in_scale, in_shift, activation,
                                                   dy_scale, act_shift, x_scale, shift);
  run_act_map(t, x.scalar_type());
  return t.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CPU, m) {
  m.impl("stream_reduce", &stream_reduce_cpu);
  m.impl("stream_map", &stream_map_cpu);
  m.impl("stream_grad_reduce", &stream_grad_reduce_cpu);
  m.impl("stream_grad_map", &stream_grad_map_cpu);
  m.impl("stream_act_reduce", &stream_act_reduce_cpu);
  m.impl("stream_act_map", &stream_act_map_cpu);
  m.impl("stream_act_grad_reduce", &stream_act_grad_reduce_cpu);
  m.impl("stream_act_grad_map", &stream_act_grad_map_cpu);
}

}  // namespace se_kernels
