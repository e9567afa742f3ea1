// The CPU kernels, compiled once per CPU capability (kernels_default.cpp with the baseline
// flags, kernels_avx2.cpp with AVX2/FMA/F16C) and chosen at run time, as ATen does for its
// own kernels: the same source, vectorized for the machine it runs on.
//
// Each call handles one group of samples (see se_cpu.cpp): pointers are at the group's
// first sample; x-shaped tensors are dense in the geometry's layout; [N, C] and [N, S]
// vectors, the weights and the biases are contiguous rows in the accumulation dtype (fp32,
// or fp64 for fp64).
#pragma once

#include <c10/core/ScalarType.h>

#include "../se_common.h"

namespace se_kernels::cpu {

struct ForwardArgs {
  Geometry geo;
  Options opt;
  c10::ScalarType dtype;  // of x, residual and out
  int64_t S;
  const void* x;
  const void* residual;  // nullptr: none
  void* out;
  const void* w1;  // [S, C]
  const void* b1;  // [S] or nullptr
  const void* w2;  // [C, S]
  const void* b2;  // [C] or nullptr
  void* z;         // [N, C] written: the pooled vector fed to the MLP
  void* zmax;      // [N, C] written for max pooling; nullptr for avg
  void* a;         // [N, S] written: pre-activation hidden units
  void* g;         // [N, C] written: pre-gate logits
};

struct BackwardArgs {
  Geometry geo;
  Options opt;
  c10::ScalarType dtype;
  int64_t S;
  const void* grad_out;
  const void* out;  // read for the output ReLU's mask; nullptr without one
  const void* x;
  const void* w1;
  const void* w2;
  const void* z;
  const void* zmax;  // nullptr for avg pooling
  const void* a;
  const void* g;
  void* dx;
  void* dresidual;  // nullptr: not wanted
  void* dw1;        // [S, C], [S], [C, S], [C] in the accumulation dtype: this group's
  void* db1;        // gradients are added to them (accumulate) or written (the first group)
  void* dw2;
  void* db2;
  bool accumulate;
};

// The stream ops (se_kernels/_stream_ops.py): one pass over the whole batch each. [N, C]
// inputs and outputs are contiguous in the accumulation dtype; a nullptr output or optional
// input is one the call does not want or give.
struct StreamReduceArgs {
  Geometry geo;
  c10::ScalarType dtype;  // of x
  const void* x;
  void* sum;
  void* sumsq;
  void* max;
  void* min;
};

struct StreamMapArgs {
  Geometry geo;
  c10::ScalarType dtype;  // of x, residual and out
  const void* x;
  const void* scale;
  const void* shift;
  const void* residual;
  void* out;
  bool out_relu;
};

struct StreamGradReduceArgs {
  Geometry geo;
  c10::ScalarType dtype;  // of grad_out, out, x and dresidual
  const void* grad_out;
  const void* out;  // read for the output ReLU's mask; nullptr without one
  const void* x;
  const void* peak;
  void* sdy;
  void* sdyx;
  void* count;      // written when peak is given
  void* dresidual;  // the masked dy
};

struct StreamGradMapArgs {
  Geometry geo;
  c10::ScalarType dtype;  // of grad_out, out, x and dx
  const void* grad_out;
  const void* out;  // as in StreamGradReduceArgs
  const void* x;
  const void* dy_scale;
  const void* x_scale;
  const void* shift;
  const void* peak;
  const void* peak_shift;  // given with peak
  void* dx;
};

// The act tail's stream ops: x read through u = in_scale * x + in_shift, v = act(u),
// d = act'(u); in_scale and in_shift are broadcast to [N, C] like the other coefficients.
struct StreamActReduceArgs {
  Geometry geo;
  c10::ScalarType dtype;  // of x
  Activation activation;
  const void* x;
  const void* in_scale;
  const void* in_shift;
  void* sum;  // sum of v
};

// out = scale * v (grad_out nullptr), or dx = d * (scale * dy + act_shift) + x_scale * x + shift.
struct StreamActMapArgs {
  Geometry geo;
  c10::ScalarType dtype;  // of grad_out, x and out
  Activation activation;
  const void* grad_out;  // nullptr: the forward map
  const void* x;
  const void* in_scale;
  const void* in_shift;
  const void* scale;
  const void* act_shift;  // the backward's
  const void* x_scale;
  const void* shift;
  void* out;
};

struct StreamActGradReduceArgs {
  Geometry geo;
  c10::ScalarType dtype;  // of grad_out and x
  Activation activation;
  const void* grad_out;
  const void* x;
  const void* in_scale;
  const void* in_shift;
  void* sdyv;
  void* sdyd;  // these four nullptr, or all written (statistics)
  void* sdydx;
  void* sd;
  void* sdx;
};

// The inference op of the linear excitation forms (se_kernels/_form_ops.py): g is a linear
// map of z across channels. One group of samples, as ForwardArgs; z, zmax (max pools) and g
// are the caller's [N, C] scratch vectors.

struct LinearFormArgs {
  Geometry geo;
  Options opt;  // gate, pool and out_activation: the form replaces the activation
  c10::ScalarType dtype;  // of x, residual and out
  LinearForm form;
  int64_t kernel;  // the convolutions' odd width
  const void* x;
  const void* residual;  // nullptr: none
  void* out;
  const void* weight;  // fc: [C, C]; conv: [kernel]
  const void* bias;    // fc: [C]; conv: [1]; nullptr: none
  void* z;
  void* zmax;
  void* g;
};

// Its backward on one group of samples, as BackwardArgs: z, zmax and g as the forward wrote
// them; the group's weight and bias gradients are written (the first group) or added.
struct LinearFormGradArgs {
  Geometry geo;
  Options opt;
  c10::ScalarType dtype;  // of grad_out, out, x, dx and dresidual
  LinearForm form;
  int64_t kernel;
  const void* grad_out;
  const void* out;  // read for the output ReLU's mask; nullptr without one
  const void* x;
  const void* weight;
  const void* z;
  const void* zmax;  // nullptr for avg pooling
  const void* g;
  void* dx;
  void* dresidual;  // nullptr: not wanted
  void* dweight;
  void* dbias;      // nullptr: no bias
  bool accumulate;
};

// A fully connected layer's products (se_kernels/_fc_ops.py): y [N, R] = x [N, K]
// weight[R, K]^T + bias [R]; its backward dx [N, K] = grad [N, R] weight, dweight [R, K] =
// grad^T x and dbias [R] = the sum of grad over n. Contiguous rows, all in one accumulation
// dtype (fp32, or fp64), which `dtype` names.
struct FcLayerOperands {
  c10::ScalarType dtype;
  int64_t N, K, R;
  const void* x;
  const void* weight;
};

struct FcLayerArgs {
  FcLayerOperands in;
  const void* bias;  // nullptr: none
  void* y;
};

struct FcLayerGradArgs {
  FcLayerOperands in;
  const void* grad;
  void* dx;
  void* dweight;
  void* dbias;  // nullptr: no bias
};

struct KernelTable {
  void (*forward)(const ForwardArgs&);
  void (*backward)(const BackwardArgs&);
  void (*stream_reduce)(const StreamReduceArgs&);
  void (*stream_map)(const StreamMapArgs&);
  void (*stream_grad_reduce)(const StreamGradReduceArgs&);
  void (*stream_grad_map)(const StreamGradMapArgs&);
  void (*linear_form)(const LinearFormArgs&);
  void (*linear_form_backward)(const LinearFormGradArgs&);
  void (*stream_act_reduce)(const StreamActReduceArgs&);
  void (*stream_act_map)(const StreamActMapArgs&);
  void (*stream_act_grad_reduce)(const StreamActGradReduceArgs&);
  void (*fc_layer)(const FcLayerArgs&);
  void (*fc_layer_backward)(const FcLayerGradArgs&);
};

namespace DEFAULT {
extern const KernelTable kKernels;
}
namespace AVX2 {
extern const KernelTable kKernels;
}

// The fastest table this CPU (and ATEN_CPU_CAPABILITY, if set) allows.
const KernelTable& kernels();

}  // namespace se_kernels::cpu
