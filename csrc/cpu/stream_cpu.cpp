// The stream ops (se_kernels/_stream_ops.py, DESIGN.md §1.4) on CPU tensors: the checks a
// direct caller gets (those of _stream_ops.check_*), the inputs made dense in the kernels'
// layout, the outputs allocated, and one call of the kernels (stream_impl.h) per op.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../se_common.h"
#include "kernels.h"

namespace se_kernels {

namespace {

using VectorList = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::ScalarType acc_type(const at::Tensor& x) { return accumulate_type(x.scalar_type()); }

// An [N, C] output in the accumulation dtype, or an empty [0] one when not wanted.
at::Tensor vector_output(const at::Tensor& x, bool wanted) {
  const auto options = x.options().dtype(acc_type(x));
  return wanted ? at::empty({x.size(0), x.size(1)}, options) : at::empty({0}, options);
}

at::Tensor x_sized_output(const at::Tensor& x, const Geometry& geo) {
  return at::empty(x.sizes(), x.options().memory_format(geo.memory_format()));
}

void check_vector(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (t) check_like(*t, name, {x.size(0), x.size(1)}, acc_type(x), x);
}

void check_x_sized(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (t) check_like(*t, name, x.sizes(), x.scalar_type(), x);
}

// An [N, C] input contiguous, or undefined when absent.
at::Tensor dense_vector(const std::optional<at::Tensor>& t) {
  return t ? t->contiguous() : at::Tensor();
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
void* data_or_null(at::Tensor& t, bool wanted) { return wanted ? t.data_ptr() : nullptr; }

// What both backward ops read: x, grad_out and (under an output ReLU, for its mask) out,
// checked and dense in x's kernel layout.
struct GradInputs {
  Geometry geo;
  bool relu;
  at::Tensor x, grad_out, out;  // out undefined without the ReLU
};

GradInputs prepare_grad(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                        const at::Tensor& x, c10::string_view out_activation) {
  check_x(x);
  check_x_sized(grad_out, "grad_out", x);
  check_x_sized(out, "out", x);
  const bool relu = parse_out_activation(out_activation) == OutActivation::ReLU;
  TORCH_CHECK(!relu || out.has_value(),
              "se_kernels: out is required when out_activation is 'relu'");
  const Geometry geo = geometry_of(x);
  const auto fmt = geo.memory_format();
  return {geo, relu, x.contiguous(fmt), grad_out.contiguous(fmt),
          relu ? out->contiguous(fmt) : at::Tensor()};
}

VectorList stream_reduce_cpu(const at::Tensor& x, bool squares, bool maxima, bool minima) {
  check_x(x);
  const Geometry geo = geometry_of(x);
  const at::Tensor xd = x.contiguous(geo.memory_format());
  at::Tensor sum = vector_output(x, true), sumsq = vector_output(x, squares);
  at::Tensor max = vector_output(x, maxima), min = vector_output(x, minima);
  if (geo.N > 0) {
    cpu::kernels().stream_reduce({geo, x.scalar_type(), xd.const_data_ptr(), sum.data_ptr(),
                                  data_or_null(sumsq, squares), data_or_null(max, maxima),
                                  data_or_null(min, minima)});
  }
  return {sum, sumsq, max, min};
}

at::Tensor stream_map_cpu(const at::Tensor& x, const at::Tensor& scale,
                          const std::optional<at::Tensor>& shift,
                          const std::optional<at::Tensor>& residual,
                          c10::string_view out_activation) {
  check_x(x);
  check_vector(scale, "scale", x);
  check_vector(shift, "shift", x);
  check_x_sized(residual, "residual", x);
  const bool relu = parse_out_activation(out_activation) == OutActivation::ReLU;
  const Geometry geo = geometry_of(x);
  const at::Tensor xd = x.contiguous(geo.memory_format());
  const at::Tensor scale_d = scale.contiguous(), shift_d = dense_vector(shift);
  const at::Tensor residual_d = residual ? residual->contiguous(geo.memory_format()) : at::Tensor();
  at::Tensor out = x_sized_output(x, geo);
  if (geo.N > 0) {
    cpu::kernels().stream_map({geo, x.scalar_type(), xd.const_data_ptr(), scale_d.const_data_ptr(),
                               data_or_null(shift_d), data_or_null(residual_d), out.data_ptr(),
                               relu});
  }
  return out;
}

VectorList stream_grad_reduce_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                                  const at::Tensor& x, const std::optional<at::Tensor>& peak,
                                  c10::string_view out_activation, bool sum_dy,
                                  bool residual_grad) {
  const GradInputs in = prepare_grad(grad_out, out, x, out_activation);
  check_vector(peak, "peak", x);
  const Geometry& geo = in.geo;
  const at::Tensor peak_d = dense_vector(peak);
  const bool write_dresidual = residual_grad && in.relu;
  at::Tensor sdy = vector_output(x, sum_dy), sdyx = vector_output(x, true);
  at::Tensor count = vector_output(x, peak.has_value());
  at::Tensor dresidual = write_dresidual ? x_sized_output(x, geo) : at::empty({0}, x.options());
  if (geo.N > 0) {
    cpu::kernels().stream_grad_reduce({geo, x.scalar_type(), in.grad_out.const_data_ptr(),
                                       data_or_null(in.out), in.x.const_data_ptr(),
                                       data_or_null(peak_d), data_or_null(sdy, sum_dy),
                                       sdyx.data_ptr(), data_or_null(count, peak.has_value()),
                                       data_or_null(dresidual, write_dresidual)});
  }
  return {sdy, sdyx, count, dresidual};
}

at::Tensor stream_grad_map_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                               const at::Tensor& x, const at::Tensor& dy_scale,
                               const std::optional<at::Tensor>& x_scale,
                               const std::optional<at::Tensor>& shift,
                               const std::optional<at::Tensor>& peak,
                               const std::optional<at::Tensor>& peak_shift,
                               c10::string_view out_activation) {
  const GradInputs in = prepare_grad(grad_out, out, x, out_activation);
  check_vector(dy_scale, "dy_scale", x);
  check_vector(x_scale, "x_scale", x);
  check_vector(shift, "shift", x);
  check_vector(peak, "peak", x);
  check_vector(peak_shift, "peak_shift", x);
  TORCH_CHECK(peak.has_value() == peak_shift.has_value(),
              "se_kernels: peak and peak_shift must be given together");
  const Geometry& geo = in.geo;
  const at::Tensor dy_scale_d = dy_scale.contiguous(), x_scale_d = dense_vector(x_scale);
  const at::Tensor shift_d = dense_vector(shift), peak_d = dense_vector(peak);
  const at::Tensor peak_shift_d = dense_vector(peak_shift);
  at::Tensor dx = x_sized_output(x, geo);
  if (geo.N > 0) {
    cpu::kernels().stream_grad_map({geo, x.scalar_type(), in.grad_out.const_data_ptr(),
                                    data_or_null(in.out), in.x.const_data_ptr(),
                                    dy_scale_d.const_data_ptr(), data_or_null(x_scale_d),
                                    data_or_null(shift_d), data_or_null(peak_d),
                                    data_or_null(peak_shift_d), dx.data_ptr()});
  }
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CPU, m) {
  m.impl("stream_reduce", &stream_reduce_cpu);
  m.impl("stream_map", &stream_map_cpu);
  m.impl("stream_grad_reduce", &stream_grad_reduce_cpu);
  m.impl("stream_grad_map", &stream_grad_map_cpu);
}

}  // namespace se_kernels
