// The option math of DESIGN.md §1.3 on the device: activations, gates and their
// derivatives, each one switch over the option with a case per value and no default.
#pragma once

#include "se_cuda_dtypes.cuh"

namespace se_kernels::cuda {
namespace detail {

// ---- the activations and gates, and their derivatives (DESIGN.md §1.3) ---------------

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float erf_(float v) { return erff(v); }
__device__ __forceinline__ double erf_(double v) { return erf(v); }
__device__ __forceinline__ float tanh_(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_(double v) { return tanh(v); }

template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {  // torch.amax propagates NaN
  return (a > b || isnan(a)) ? a : b;
}
template <typename A>
__device__ __forceinline__ A nan_min(A a, A b) {  // torch.amin propagates NaN
  return (a < b || isnan(a)) ? a : b;
}
template <typename A>
__device__ __forceinline__ A sigmoid_(A v) { return A(1) / (A(1) + exp_(-v)); }
template <typename A>
__device__ __forceinline__ A gelu_cdf(A a) { return A(0.5) * (A(1) + erf_(a * A(kSqrtHalf))); }
template <typename A>
__device__ __forceinline__ A gelu_tanh_t(A a) {
  return tanh_(A(kSqrt2OverPi) * (a + A(kGeluTanhCubic) * a * a * a));
}
// The option math of DESIGN.md §1.3: one switch per function, a case per value and no
// default (se_options.h; the emulator's host build has -Werror=switch).
template <typename A>
__device__ __forceinline__ A activation(A a, Activation kind) {
  switch (kind) {
    case Activation::ReLU: return a < A(0) ? A(0) : a;  // relu keeps NaN, as torch's
    case Activation::SiLU: return a / (A(1) + exp_(-a));
    case Activation::GELU: return a * gelu_cdf(a);
    case Activation::GELUTanh: return A(0.5) * a * (A(1) + gelu_tanh_t(a));
    case Activation::HardSwish: {
      A t = a + A(3);  // comparisons rather than fmin/fmax so NaN stays NaN, as in torch
      t = t < A(0) ? A(0) : t;
      t = t > A(6) ? A(6) : t;
      return a * t / A(6);
    }
    case Activation::LeakyReLU: return a > A(0) ? a : a * A(kLeakyReluSlope);
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
    case Activation::GELU:
      return dh * (gelu_cdf(a) + a * A(kInvSqrt2Pi) * exp_(A(-0.5) * a * a));
    case Activation::GELUTanh: {
      const A t = gelu_tanh_t(a);
      const A inner_grad = A(kSqrt2OverPi) * (A(1) + A(3 * kGeluTanhCubic) * a * a);
      return dh * (A(0.5) * (A(1) + t) + A(0.5) * a * (A(1) - t * t) * inner_grad);
    }
    case Activation::HardSwish:  // torch's backward: 0 below -3, a/3 + 1/2 up to 3, then 1
      return a < A(-3) ? A(0) : dh * (a <= A(3) ? a / A(3) + A(0.5) : A(1));
    case Activation::LeakyReLU: return a > A(0) ? dh : dh * A(kLeakyReluSlope);
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
    case Gate::Tanh: return tanh_(g);
    case Gate::ReLU: return g < A(0) ? A(0) : g;
  }
  return g;  // not reached
}
// d gate(g) / dg applied to ds, given s = gate(g). Hardsigmoid uses torch's open interval.
template <typename A>
__device__ __forceinline__ A gate_backward(A g, A s, A ds, Gate kind) {
  switch (kind) {
    case Gate::Sigmoid: return ds * s * (A(1) - s);
    case Gate::HardSigmoid: return (g > A(-3) && g < A(3)) ? ds / A(6) : A(0);
    case Gate::Tanh: return ds * (A(1) - s * s);
    case Gate::ReLU: return g > A(0) ? ds : A(0);
  }
  return ds;  // not reached
}

}  // namespace detail
}  // namespace se_kernels::cuda
