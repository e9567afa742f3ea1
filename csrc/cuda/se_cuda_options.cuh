// The option math of DESIGN.md §1.3 on the device: activations, gates and their
// derivatives, each one switch over the option with a case per value and no default.
#pragma once

#include "se_cuda_dtypes.cuh"

namespace se_kernels::cuda {
namespace detail {

// ---- the activations and gates, and their derivatives (DESIGN.md §1.3) ---------------

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }

template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {  // torch.amax propagates NaN
  return (a > b || isnan(a)) ? a : b;
}
template <typename A>
__device__ __forceinline__ A sigmoid_(A v) { return A(1) / (A(1) + exp_(-v)); }
// The option math of DESIGN.md §1.3: one switch per function, a case per value and no
// default (se_options.h; the emulator's host build has -Werror=switch).
template <typename A>
__device__ __forceinline__ A activation(A a, Activation kind) {
  switch (kind) {
    case Activation::ReLU: return a < A(0) ? A(0) : a;  // relu keeps NaN, as torch's
    case Activation::SiLU: return a / (A(1) + exp_(-a));
  }
  return a;  // not reached
}
// d activation(a) / da applied to the incoming gradient dh.
template <typename A>
__device__ __forceinline__ A activation_backward(A a, A dh, Activation kind) {
  switch (kind) {
    case Activation::ReLU: return a > A(0) ? dh : A(0);
    case Activation::SiLU: {
      const A sig = sigmoid_(a);
      return dh * sig * (A(1) + a * (A(1) - sig));
    }
  }
  return dh;  // not reached
}
template <typename A>
__device__ __forceinline__ A gate(A g, Gate kind) {
  switch (kind) {
    case Gate::Sigmoid: return sigmoid_(g);
    case Gate::HardSigmoid: {
      A t = g + A(3);  // comparisons rather than fmin/fmax so NaN stays NaN, as in torch
      t = t < A(0) ? A(0) : t;
      t = t > A(6) ? A(6) : t;
      return t / A(6);
    }
  }
  return g;  // not reached
}
// d gate(g) / dg applied to ds, given s = gate(g). Hardsigmoid uses torch's open interval.
template <typename A>
__device__ __forceinline__ A gate_backward(A g, A s, A ds, Gate kind) {
  switch (kind) {
    case Gate::Sigmoid: return ds * s * (A(1) - s);
    case Gate::HardSigmoid: return (g > A(-3) && g < A(3)) ? ds / A(6) : A(0);
  }
  return ds;  // not reached
}

}  // namespace detail
}  // namespace se_kernels::cuda
