#include "se_common.h"

#include <ATen/ATen.h>

#include <string>

namespace se_kernels {

namespace {

template <typename Enum, size_t K>
Enum parse_choice(const char* arg, c10::string_view value, const OptionName<Enum> (&names)[K]) {
  if (const auto found = find_option(std::string_view(value.data(), value.size()), names))
    return *found;
  std::string expected;
  for (const auto& option : names) {
    expected += expected.empty() ? "" : ", ";
    expected += std::string("'") + option.name + "'";
  }
  TORCH_CHECK(false, "se_kernels: ", arg, " must be one of ", expected, ", got '",
              std::string(value), "'");
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "se_kernels: ", name, " must have dtype ",
              x.scalar_type(), " like x, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "se_kernels: ", name, " must be on ", x.device(),
              " like x, got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "se_kernels: ", name, " must have shape ", expected,
              ", got ", t.sizes());
}

void check_stat(const at::Tensor& t, const char* name, at::IntArrayRef expected,
                const at::Tensor& x) {
  check_shape(t, name, expected);
  TORCH_CHECK(t.scalar_type() == accumulate_type(x.scalar_type()) && t.device() == x.device(),
              "se_kernels: ", name, " must be ", accumulate_type(x.scalar_type()), " on ",
              x.device(), " (as saved by se_forward), got ", t.scalar_type(), " on ", t.device());
}

// x's dtype and sizes, after its rank (both contracts word the rank differently).
void check_x_dtype_and_sizes(const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "se_kernels: x must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1,
              "se_kernels: x must have C, H and W >= 1, got shape ", x.sizes());
}

}  // namespace

Options parse_options(c10::string_view activation, c10::string_view gate, c10::string_view pool,
                      c10::string_view out_activation) {
  return Options{parse_choice("activation", activation, kActivationNames),
                 parse_choice("gate", gate, kGateNames), parse_choice("pool", pool, kPoolNames),
                 parse_choice("out_activation", out_activation, kOutActivationNames)};
}

OutActivation parse_out_activation(c10::string_view out_activation) {
  return parse_choice("out_activation", out_activation, kOutActivationNames);
}

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_forward_args(const at::Tensor& x, const at::Tensor& w1,
                        const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                        const std::optional<at::Tensor>& b2,
                        const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4, "se_kernels: x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  check_x_dtype_and_sizes(x);
  const int64_t C = x.size(1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) >= 1,
              "se_kernels: w1 must be 2-D [squeeze_channels >= 1, C], got shape ", w1.sizes());
  const int64_t S = w1.size(0);
  check_shape(w1, "w1", {S, C});
  check_shape(w2, "w2", {C, S});
  check_same(w1, "w1", x);
  check_same(w2, "w2", x);
  if (b1) {
    check_shape(*b1, "b1", {S});
    check_same(*b1, "b1", x);
  }
  if (b2) {
    check_shape(*b2, "b2", {C});
    check_same(*b2, "b2", x);
  }
  if (residual) {
    check_shape(*residual, "residual", x.sizes());
    check_same(*residual, "residual", x);
  }
}

void check_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                         const std::optional<at::Tensor>& out, const at::Tensor& w1,
                         const at::Tensor& w2, const at::Tensor& z, const at::Tensor& zmax,
                         const at::Tensor& a, const at::Tensor& g, const Options& opt) {
  check_forward_args(x, w1, std::nullopt, w2, std::nullopt, std::nullopt);
  check_shape(grad_out, "grad_out", x.sizes());
  check_same(grad_out, "grad_out", x);
  if (opt.out_relu()) {
    TORCH_CHECK(out.has_value(), "se_kernels: out is required when out_activation is 'relu'");
    check_shape(*out, "out", x.sizes());
    check_same(*out, "out", x);
  }
  const int64_t N = x.size(0), C = x.size(1), S = w1.size(0);
  check_stat(z, "z", {N, C}, x);
  check_stat(a, "a", {N, S}, x);
  check_stat(g, "g", {N, C}, x);
  if (opt.uses_max()) check_stat(zmax, "zmax", {N, C}, x);
}

Geometry geometry_of(const at::Tensor& x) {
  const bool channels_last =
      !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return Geometry{x.size(0), x.size(1), x.size(2) * x.size(3), channels_last};
}

namespace {
at::Tensor dense(const std::optional<at::Tensor>& t, at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  return t ? t->contiguous(fmt) : at::Tensor();
}
}  // namespace

ForwardTensors prepare_forward(const at::Tensor& x, const at::Tensor& w1,
                               const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                               const std::optional<at::Tensor>& b2,
                               const std::optional<at::Tensor>& residual,
                               c10::string_view activation, c10::string_view gate,
                               c10::string_view pool, c10::string_view out_activation) {
  ForwardTensors t;
  t.opt = parse_options(activation, gate, pool, out_activation);
  check_forward_args(x, w1, b1, w2, b2, residual);
  t.geo = geometry_of(x);
  t.S = w1.size(0);
  const auto fmt = t.geo.memory_format();
  // Dense inputs are read in place, in either layout; anything else is made dense first.
  t.x = x.contiguous(fmt);
  t.residual = dense(residual, fmt);
  t.w1 = w1.contiguous();
  t.w2 = w2.contiguous();
  t.b1 = dense(b1);
  t.b2 = dense(b2);
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  const int64_t N = t.geo.N, C = t.geo.C;
  t.out = at::empty(x.sizes(), x.options().memory_format(fmt));
  t.z = at::empty({N, C}, acc);
  t.zmax = t.opt.uses_max() ? at::empty({N, C}, acc) : at::empty({0}, acc);
  t.a = at::empty({N, t.S}, acc);
  t.g = at::empty({N, C}, acc);
  return t;
}

BackwardTensors prepare_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                 const std::optional<at::Tensor>& out, const at::Tensor& w1,
                                 const at::Tensor& w2, const at::Tensor& z, const at::Tensor& zmax,
                                 const at::Tensor& a, const at::Tensor& g,
                                 c10::string_view activation, c10::string_view gate,
                                 c10::string_view pool, c10::string_view out_activation,
                                 bool residual_grad) {
  BackwardTensors t;
  t.opt = parse_options(activation, gate, pool, out_activation);
  check_backward_args(grad_out, x, out, w1, w2, z, zmax, a, g, t.opt);
  t.geo = geometry_of(x);
  t.S = w1.size(0);
  const auto fmt = t.geo.memory_format();
  t.x = x.contiguous(fmt);
  t.grad_out = grad_out.contiguous(fmt);  // autograd may hand in any strides, even expanded
  t.out = t.opt.out_relu() ? out->contiguous(fmt) : at::Tensor();
  t.w1 = w1.contiguous();
  t.w2 = w2.contiguous();
  t.z = z.contiguous();
  t.zmax = t.opt.uses_max() ? zmax.contiguous() : at::Tensor();
  t.a = a.contiguous();
  t.g = g.contiguous();
  t.dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  t.dresidual = t.opt.out_relu() && residual_grad
                    ? at::empty(x.sizes(), x.options().memory_format(fmt))
                    : at::empty({0}, x.options());
  return t;
}

// ---- the stream ops ----------------------------------------------------------------

namespace {

void check_stream_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "se_kernels: x must be a 4-D tensor [N, C, H, W], got ", x.sizes());
  check_x_dtype_and_sizes(x);
}

// t is [shape], of `dtype`, on x's device (_stream_ops._check_like).
void check_like(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& x,
                at::ScalarType dtype) {
  check_shape(t, name, shape);
  TORCH_CHECK(t.scalar_type() == dtype, "se_kernels: ", name, " must have dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "se_kernels: ", name, " must be on device ", x.device(),
              " like x, got ", t.device());
}
void check_x_sized(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (t) check_like(*t, name, x.sizes(), x, x.scalar_type());
}
void check_vector(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (t) check_like(*t, name, {x.size(0), x.size(1)}, x, accumulate_type(x.scalar_type()));
}
// The output activation, with `out` given when it is a ReLU (_stream_ops._check_out).
bool stream_relu(const std::optional<at::Tensor>& out, c10::string_view out_activation) {
  const bool relu = parse_out_activation(out_activation) == OutActivation::ReLU;
  TORCH_CHECK(!relu || out.has_value(),
              "se_kernels: out is required when out_activation is 'relu'");
  return relu;
}

// An [N, C] output in the accumulation dtype, or [0] when not wanted.
at::Tensor stream_vector(const at::Tensor& x, bool wanted) {
  const auto acc = x.options().dtype(accumulate_type(x.scalar_type()));
  return wanted ? at::empty({x.size(0), x.size(1)}, acc) : at::empty({0}, acc);
}
at::Tensor stream_x_sized(const at::Tensor& x, const Geometry& geo) {
  return at::empty(x.sizes(), x.options().memory_format(geo.memory_format()));
}

// The x-sized inputs of a backward stream op checked, with out_activation, and made dense in
// the kernels' layout (out only under an output ReLU).
template <typename Tensors>
void prepare_grad_inputs(Tensors& t, const at::Tensor& grad_out,
                         const std::optional<at::Tensor>& out, const at::Tensor& x,
                         c10::string_view out_activation) {
  check_stream_x(x);
  check_x_sized(grad_out, "grad_out", x);
  check_x_sized(out, "out", x);
  const bool relu = stream_relu(out, out_activation);
  t.geo = geometry_of(x);
  const auto fmt = t.geo.memory_format();
  t.grad_out = grad_out.contiguous(fmt);
  t.out = relu ? out->contiguous(fmt) : at::Tensor();
  t.x = x.contiguous(fmt);
}

// A map pass's x and residual checked and made dense in the kernels' layout, and its
// output allocated in that layout.
template <typename Tensors>
void prepare_map_inputs(Tensors& t, const at::Tensor& x, const std::optional<at::Tensor>& residual) {
  check_x_sized(residual, "residual", x);
  t.geo = geometry_of(x);
  const auto fmt = t.geo.memory_format();
  t.x = x.contiguous(fmt);
  t.residual = dense(residual, fmt);
  t.out = stream_x_sized(x, t.geo);
}

}  // namespace

StreamReduceTensors prepare_stream_reduce(const at::Tensor& x, bool squares, bool maxima,
                                          bool minima) {
  check_stream_x(x);
  StreamReduceTensors t;
  t.geo = geometry_of(x);
  t.x = x.contiguous(t.geo.memory_format());
  t.sum = stream_vector(x, true);
  t.sumsq = stream_vector(x, squares);
  t.max = stream_vector(x, maxima);
  t.min = stream_vector(x, minima);
  return t;
}

StreamMapTensors prepare_stream_map(const at::Tensor& x, const at::Tensor& scale,
                                    const std::optional<at::Tensor>& shift,
                                    const std::optional<at::Tensor>& residual,
                                    c10::string_view out_activation) {
  check_stream_x(x);
  check_vector(scale, "scale", x);
  check_vector(shift, "shift", x);
  StreamMapTensors t;
  prepare_map_inputs(t, x, residual);
  t.relu = parse_out_activation(out_activation) == OutActivation::ReLU;
  t.scale = scale.contiguous();
  t.shift = dense(shift);
  return t;
}

namespace {

// The form's name, and its weight and bias checked against x (_form_ops.check_args); the
// convolutions' width in `kernel`, 0 for fc.
LinearForm check_linear_form(const at::Tensor& x, c10::string_view form, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, int64_t& kernel) {
  const LinearForm parsed = parse_choice("form", form, kLinearFormNames);
  const int64_t C = x.size(1);
  const auto acc = accumulate_type(x.scalar_type());
  switch (parsed) {
    case LinearForm::Fc:
      kernel = 0;
      check_like(weight, "weight", {C, C}, x, acc);
      if (bias) check_like(*bias, "bias", {C}, x, acc);
      break;
    case LinearForm::Conv:
    case LinearForm::CircularConv:
      TORCH_CHECK(weight.dim() == 1 && weight.size(0) % 2 == 1,
                  "se_kernels: weight of a conv form must be 1-D with an odd width, got shape ",
                  weight.sizes());
      kernel = weight.size(0);
      check_like(weight, "weight", {kernel}, x, acc);
      if (bias) check_like(*bias, "bias", {1}, x, acc);
      break;
  }
  return parsed;
}

Options linear_form_options(c10::string_view gate, c10::string_view pool,
                            c10::string_view out_activation) {
  return Options{Activation::ReLU,  // unused: the form has no activation
                 parse_choice("gate", gate, kGateNames), parse_choice("pool", pool, kPoolNames),
                 parse_out_activation(out_activation)};
}

}  // namespace

LinearFormTensors prepare_linear_form(const at::Tensor& x, c10::string_view form,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, c10::string_view gate,
                                      c10::string_view pool,
                                      const std::optional<at::Tensor>& residual,
                                      c10::string_view out_activation) {
  check_stream_x(x);
  LinearFormTensors t;
  t.form = check_linear_form(x, form, weight, bias, t.kernel);
  t.opt = linear_form_options(gate, pool, out_activation);
  prepare_map_inputs(t, x, residual);
  t.weight = weight.contiguous();
  t.bias = dense(bias);
  t.z = stream_vector(x, true);
  t.zmax = stream_vector(x, t.opt.uses_max());
  t.g = stream_vector(x, true);
  return t;
}

LinearFormGradTensors prepare_linear_form_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& x,
    c10::string_view form, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& z, const std::optional<at::Tensor>& zmax, const at::Tensor& g,
    c10::string_view gate, c10::string_view pool, c10::string_view out_activation,
    bool residual_grad) {
  LinearFormGradTensors t;
  prepare_grad_inputs(t, grad_out, out, x, out_activation);
  t.form = check_linear_form(x, form, weight, bias, t.kernel);
  t.opt = linear_form_options(gate, pool, out_activation);
  check_vector(z, "z", x);
  check_vector(g, "g", x);
  check_vector(zmax, "zmax", x);
  TORCH_CHECK(!t.opt.uses_max() || zmax.has_value(),
              "se_kernels: zmax is required when pool is '", pool, "'");
  t.weight = weight.contiguous();
  t.z = z.contiguous();
  t.zmax = t.opt.uses_max() ? zmax->contiguous() : at::Tensor();
  t.g = g.contiguous();
  t.dx = stream_x_sized(x, t.geo);
  t.dresidual = t.out.defined() && residual_grad ? stream_x_sized(x, t.geo)
                                                 : at::empty({0}, x.options());
  // Summed over the sample groups in the accumulation dtype: zeros for an empty batch.
  t.dweight = at::zeros(weight.sizes(), weight.options());
  t.dbias = bias ? at::zeros(bias->sizes(), bias->options()) : at::empty({0}, weight.options());
  return t;
}

StreamGradReduceTensors prepare_stream_grad_reduce(const at::Tensor& grad_out,
                                                   const std::optional<at::Tensor>& out,
                                                   const at::Tensor& x,
                                                   const std::optional<at::Tensor>& peak,
                                                   c10::string_view out_activation, bool sum_dy,
                                                   bool residual_grad) {
  StreamGradReduceTensors t;
  prepare_grad_inputs(t, grad_out, out, x, out_activation);
  check_vector(peak, "peak", x);
  t.peak = dense(peak);
  t.sdy = stream_vector(x, sum_dy);
  t.sdyx = stream_vector(x, true);
  t.count = stream_vector(x, peak.has_value());
  t.dresidual = t.out.defined() && residual_grad ? stream_x_sized(x, t.geo)
                                                 : at::empty({0}, x.options());
  return t;
}

StreamGradMapTensors prepare_stream_grad_map(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& x,
    const at::Tensor& dy_scale, const std::optional<at::Tensor>& x_scale,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& peak,
    const std::optional<at::Tensor>& peak_shift, c10::string_view out_activation) {
  StreamGradMapTensors t;
  prepare_grad_inputs(t, grad_out, out, x, out_activation);
  check_vector(dy_scale, "dy_scale", x);
  check_vector(x_scale, "x_scale", x);
  check_vector(shift, "shift", x);
  check_vector(peak, "peak", x);
  check_vector(peak_shift, "peak_shift", x);
  TORCH_CHECK(peak.has_value() == peak_shift.has_value(),
              "se_kernels: peak and peak_shift must be given together");
  t.dy_scale = dy_scale.contiguous();
  t.x_scale = dense(x_scale);
  t.shift = dense(shift);
  t.peak = dense(peak);
  t.peak_shift = dense(peak_shift);
  t.dx = stream_x_sized(x, t.geo);
  return t;
}

// ---- the act tail's stream ops --------------------------------------------------------

namespace {

// x, the prologue's vectors and the activation checked (_stream_ops._check_prologue); x
// dense in the kernels' layout, in_scale and in_shift broadcast to [N, C].
StreamActTensors prepare_act_prologue(const at::Tensor& x, const at::Tensor& in_scale,
                                      const at::Tensor& in_shift, c10::string_view activation) {
  check_stream_x(x);
  const auto acc = accumulate_type(x.scalar_type());
  check_like(in_scale, "in_scale", {x.size(1)}, x, acc);
  check_like(in_shift, "in_shift", {x.size(1)}, x, acc);
  StreamActTensors t;
  t.activation = parse_choice("activation", activation, kActivationNames);
  t.geo = geometry_of(x);
  t.x = x.contiguous(t.geo.memory_format());
  t.in_scale = in_scale.expand({x.size(0), x.size(1)}).contiguous();
  t.in_shift = in_shift.expand({x.size(0), x.size(1)}).contiguous();
  return t;
}

}  // namespace

StreamActTensors prepare_stream_act_reduce(const at::Tensor& x, const at::Tensor& in_scale,
                                           const at::Tensor& in_shift,
                                           c10::string_view activation) {
  StreamActTensors t = prepare_act_prologue(x, in_scale, in_shift, activation);
  t.sum = stream_vector(x, true);
  return t;
}

StreamActTensors prepare_stream_act_map(const at::Tensor& x, const at::Tensor& in_scale,
                                        const at::Tensor& in_shift, c10::string_view activation,
                                        const at::Tensor& scale) {
  StreamActTensors t = prepare_act_prologue(x, in_scale, in_shift, activation);
  check_vector(scale, "scale", x);
  t.scale = scale.contiguous();
  t.out = stream_x_sized(x, t.geo);
  return t;
}

StreamActTensors prepare_stream_act_grad_reduce(const at::Tensor& grad_out, const at::Tensor& x,
                                                const at::Tensor& in_scale,
                                                const at::Tensor& in_shift,
                                                c10::string_view activation, bool statistics) {
  StreamActTensors t = prepare_act_prologue(x, in_scale, in_shift, activation);
  check_x_sized(grad_out, "grad_out", x);
  t.grad_out = grad_out.contiguous(t.geo.memory_format());
  t.sdyv = stream_vector(x, true);
  t.sdyd = stream_vector(x, statistics);
  t.sdydx = stream_vector(x, statistics);
  t.sd = stream_vector(x, statistics);
  t.sdx = stream_vector(x, statistics);
  return t;
}

StreamActTensors prepare_stream_act_grad_map(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& in_scale,
    const at::Tensor& in_shift, c10::string_view activation, const at::Tensor& dy_scale,
    const at::Tensor& act_shift, const std::optional<at::Tensor>& x_scale,
    const std::optional<at::Tensor>& shift) {
  StreamActTensors t = prepare_act_prologue(x, in_scale, in_shift, activation);
  check_x_sized(grad_out, "grad_out", x);
  check_vector(dy_scale, "dy_scale", x);
  check_vector(act_shift, "act_shift", x);
  check_vector(x_scale, "x_scale", x);
  check_vector(shift, "shift", x);
  t.grad_out = grad_out.contiguous(t.geo.memory_format());
  t.scale = dy_scale.contiguous();
  t.act_shift = act_shift.contiguous();
  t.x_scale = dense(x_scale);
  t.shift = dense(shift);
  t.out = stream_x_sized(x, t.geo);
  return t;
}

// ---- a fully connected layer's products ---------------------------------------------

namespace {

// t has `shape`, x's dtype and x's device: _ops._check_like's checks, in its order, with
// its error types (ValueError, TypeError), which the fc ops' callers see from both.
void check_fc_like(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                   const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "se_kernels: ", name, " must have shape ", shape,
                    ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "se_kernels: ", name,
                   " must have dtype ", x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_TYPE(t.device() == x.device(), "se_kernels: ", name, " must be on device ",
                   x.device(), " like x, got ", t.device());
}

// x and weight of a layer y = x weight^T + b: 2-D, one accumulation dtype, one device.
void check_fc_operands(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "se_kernels: x must be float32 or float64 (the accumulation dtype), got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "se_kernels: x must be a 2-D tensor [N, K], got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2,
                    "se_kernels: weight must be a 2-D tensor [R, K], got shape ",
                    weight.sizes());
  check_fc_like(weight, "weight", {weight.size(0), x.size(1)}, x);
}

}  // namespace

FcLayerTensors prepare_fc_layer(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  check_fc_operands(x, weight);
  FcLayerTensors t;
  t.N = x.size(0);
  t.K = x.size(1);
  t.R = weight.size(0);
  if (bias) check_fc_like(*bias, "bias", {t.R}, x);
  t.x = x.contiguous();
  t.weight = weight.contiguous();
  t.bias = dense(bias);
  t.y = at::empty({t.N, t.R}, x.options());
  return t;
}

FcLayerGradTensors prepare_fc_layer_backward(const at::Tensor& grad, const at::Tensor& x,
                                             const at::Tensor& weight, bool bias) {
  check_fc_operands(x, weight);
  FcLayerGradTensors t;
  t.N = x.size(0);
  t.K = x.size(1);
  t.R = weight.size(0);
  check_fc_like(grad, "grad", {t.N, t.R}, x);
  t.grad = grad.contiguous();
  t.x = x.contiguous();
  t.weight = weight.contiguous();
  t.dx = at::empty({t.N, t.K}, x.options());
  t.dweight = at::empty({t.R, t.K}, x.options());
  t.dbias = at::empty({bias ? t.R : 0}, x.options());
  return t;
}

}  // namespace se_kernels
