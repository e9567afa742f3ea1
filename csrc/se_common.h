// Shared by the CPU and CUDA implementations of the se_kernels ops: option parsing,
// argument checks and the geometry of x. The options themselves are in se_options.h.
//
// The op schemas live in Python (se_kernels/_ops.py) so the ops, their fake kernels and
// their autograd exist even when this extension is not built; this library only adds
// device kernels to them with TORCH_LIBRARY_IMPL.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "se_options.h"

namespace se_kernels {

// The options named by the ops' string arguments; an unknown name is an error that lists
// the valid ones.
Options parse_options(c10::string_view activation, c10::string_view gate, c10::string_view pool,
                      c10::string_view out_activation);

// (out, z, zmax, a, g): see se_kernels/_ops.py for what each holds.
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (dx, dw1, db1, dw2, db2, dresidual)
using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_forward_args(const at::Tensor& x, const at::Tensor& w1,
                        const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                        const std::optional<at::Tensor>& b2,
                        const std::optional<at::Tensor>& residual);

void check_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                         const std::optional<at::Tensor>& out, const at::Tensor& w1,
                         const at::Tensor& w2, const at::Tensor& z, const at::Tensor& zmax,
                         const at::Tensor& a, const at::Tensor& g, const Options& opt);

// The out_activation named by the stream ops' string argument (as parse_options).
OutActivation parse_out_activation(c10::string_view out_activation);

// Kernels walk x in one of two dense layouts: NCHW (rows of H*W per channel) or
// channels-last (rows of C per pixel). Anything else is copied to NCHW first.
// A tensor that is dense in both (C == 1 or H*W == 1) is walked as NCHW.
struct Geometry {
  int64_t N, C, P;  // P = H * W
  bool channels_last;

  at::MemoryFormat memory_format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};
Geometry geometry_of(const at::Tensor& x);

// Pooled statistics and the MLP run in fp32 (fp64 for fp64 inputs).
at::ScalarType accumulate_type(at::ScalarType t);

// What every device implementation of se_forward starts from: the options parsed, the
// arguments checked, the inputs dense in the kernels' layout (undefined where absent), and
// the op's outputs allocated (zmax is [0] for avg pooling).
struct ForwardTensors {
  Options opt;
  Geometry geo;
  int64_t S;
  at::Tensor x, residual, w1, b1, w2, b2;
  at::Tensor out, z, zmax, a, g;
};
ForwardTensors prepare_forward(const at::Tensor& x, const at::Tensor& w1,
                               const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                               const std::optional<at::Tensor>& b2,
                               const std::optional<at::Tensor>& residual,
                               c10::string_view activation, c10::string_view gate,
                               c10::string_view pool, c10::string_view out_activation);

// The same for se_backward: out is defined only with an output ReLU, zmax only for max
// pooling; dresidual is allocated when the residual's gradient is the masked dy, else [0].
// The weight gradients are left to each implementation (their dtype of accumulation varies).
struct BackwardTensors {
  Options opt;
  Geometry geo;
  int64_t S;
  at::Tensor grad_out, x, out, w1, w2, z, zmax, a, g;
  at::Tensor dx, dresidual;
};
BackwardTensors prepare_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                 const std::optional<at::Tensor>& out, const at::Tensor& w1,
                                 const at::Tensor& w2, const at::Tensor& z, const at::Tensor& zmax,
                                 const at::Tensor& a, const at::Tensor& g,
                                 c10::string_view activation, c10::string_view gate,
                                 c10::string_view pool, c10::string_view out_activation,
                                 bool residual_grad);

// The stream ops (se_kernels/_stream_ops.py, whose check_* these mirror), as prepare_forward:
// arguments checked, x-sized inputs dense in the kernels' layout and [N, C] vectors contiguous
// (undefined where absent; `out` only under an output ReLU), outputs allocated: x-sized ones
// in x's dtype and the kernels' layout, [N, C] ones in the accumulation dtype, [0] where not
// asked for.
struct StreamReduceTensors {
  Geometry geo;
  at::Tensor x;
  at::Tensor sum, sumsq, max, min;
};
StreamReduceTensors prepare_stream_reduce(const at::Tensor& x, bool squares, bool maxima,
                                          bool minima);

struct StreamMapTensors {
  Geometry geo;
  bool relu;
  at::Tensor x, scale, shift, residual;
  at::Tensor out;
};
StreamMapTensors prepare_stream_map(const at::Tensor& x, const at::Tensor& scale,
                                    const std::optional<at::Tensor>& shift,
                                    const std::optional<at::Tensor>& residual,
                                    c10::string_view out_activation);

// The linear excitation forms' inference op (se_kernels/_form_ops.py, whose check_* this
// mirrors): g is a linear map of z across channels, one matrix or one odd-width convolution.
enum class LinearForm : int { Fc = 0, Conv = 1, CircularConv = 2 };
inline constexpr OptionName<LinearForm> kLinearFormNames[] = {
    {"fc", LinearForm::Fc}, {"conv", LinearForm::Conv}, {"circular_conv", LinearForm::CircularConv}};

struct LinearFormTensors {
  Options opt;  // its activation is unused: the form has none
  Geometry geo;
  LinearForm form;
  int64_t kernel;  // the convolutions' width, 0 for fc
  at::Tensor x, weight, bias, residual;
  at::Tensor out, z, zmax, g;
};
LinearFormTensors prepare_linear_form(const at::Tensor& x, c10::string_view form,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, c10::string_view gate,
                                      c10::string_view pool,
                                      const std::optional<at::Tensor>& residual,
                                      c10::string_view out_activation);

// Its backward: the gradients of x, the residual, weight and bias from grad_out and what the
// forward returned (z, zmax for max pools, g; out under an output ReLU).
struct LinearFormGradTensors {
  Options opt;  // its activation is unused, as in LinearFormTensors
  Geometry geo;
  LinearForm form;
  int64_t kernel;
  at::Tensor grad_out, out, x, weight, z, zmax, g;
  at::Tensor dx, dresidual, dweight, dbias;  // dbias [0] without a bias
};
LinearFormGradTensors prepare_linear_form_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& x,
    c10::string_view form, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& z, const std::optional<at::Tensor>& zmax, const at::Tensor& g,
    c10::string_view gate, c10::string_view pool, c10::string_view out_activation,
    bool residual_grad);

// A fully connected layer's products (se_kernels/_fc_ops.py, whose check_* these mirror):
// y [N, R] = x [N, K] weight[R, K]^T + bias [R], and the gradients of x, weight and bias
// from grad [N, R]. Every tensor 2-D (bias 1-D), in one accumulation dtype (fp32 or fp64),
// contiguous (undefined bias where absent); outputs allocated, dbias [0] without a bias.
struct FcLayerTensors {
  int64_t N, K, R;
  at::Tensor x, weight, bias;
  at::Tensor y;
};
FcLayerTensors prepare_fc_layer(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias);

struct FcLayerGradTensors {
  int64_t N, K, R;
  at::Tensor grad, x, weight;
  at::Tensor dx, dweight, dbias;
};
FcLayerGradTensors prepare_fc_layer_backward(const at::Tensor& grad, const at::Tensor& x,
                                             const at::Tensor& weight, bool bias);

struct StreamGradReduceTensors {
  Geometry geo;
  at::Tensor grad_out, out, x, peak;
  at::Tensor sdy, sdyx, count, dresidual;
};
StreamGradReduceTensors prepare_stream_grad_reduce(const at::Tensor& grad_out,
                                                   const std::optional<at::Tensor>& out,
                                                   const at::Tensor& x,
                                                   const std::optional<at::Tensor>& peak,
                                                   c10::string_view out_activation, bool sum_dy,
                                                   bool residual_grad);

struct StreamGradMapTensors {
  Geometry geo;
  at::Tensor grad_out, out, x, dy_scale, x_scale, shift, peak, peak_shift;
  at::Tensor dx;
};
StreamGradMapTensors prepare_stream_grad_map(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& x,
    const at::Tensor& dy_scale, const std::optional<at::Tensor>& x_scale,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& peak,
    const std::optional<at::Tensor>& peak_shift, c10::string_view out_activation);

// The act tail's stream ops (_stream_ops.check_act_*): x read through the prologue
// u = in_scale[c] * x + in_shift[c], v = activation(u). in_scale and in_shift ([C] in the
// accumulation dtype) are broadcast to contiguous [N, C] for the kernels; x-sized inputs
// are dense in the kernels' layout, optional vectors undefined where absent.
struct StreamActTensors {
  Geometry geo;
  Activation activation;
  at::Tensor grad_out, x, in_scale, in_shift;
  at::Tensor scale, act_shift, x_scale, shift;  // the maps' coefficients
  at::Tensor sum;                               // stream_act_reduce
  at::Tensor sdyv, sdyd, sdydx, sd, sdx;        // stream_act_grad_reduce ([0] unless statistics)
  at::Tensor out;                               // the maps' output
};
StreamActTensors prepare_stream_act_reduce(const at::Tensor& x, const at::Tensor& in_scale,
                                           const at::Tensor& in_shift,
                                           c10::string_view activation);
StreamActTensors prepare_stream_act_map(const at::Tensor& x, const at::Tensor& in_scale,
                                        const at::Tensor& in_shift, c10::string_view activation,
                                        const at::Tensor& scale);
StreamActTensors prepare_stream_act_grad_reduce(const at::Tensor& grad_out, const at::Tensor& x,
                                                const at::Tensor& in_scale,
                                                const at::Tensor& in_shift,
                                                c10::string_view activation, bool statistics);
StreamActTensors prepare_stream_act_grad_map(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& in_scale,
    const at::Tensor& in_shift, c10::string_view activation, const at::Tensor& dy_scale,
    const at::Tensor& act_shift, const std::optional<at::Tensor>& x_scale,
    const std::optional<at::Tensor>& shift);

}  // namespace se_kernels
