// The CPU passes over x, compiled once per CPU capability (kernels_default.cpp with the
// baseline flags, kernels_avx2.cpp with AVX2/FMA/F16C) and chosen at run time, as ATen
// does for its own kernels: the same source, vectorized for the machine it runs on.
//
// Each pass works on a group of samples described by a Geometry; tensors are dense in the
// geometry's layout. Per-channel vectors ([N, C]) are contiguous in the accumulation dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include "../se_common.h"

namespace se_kernels::cpu {

struct KernelTable {
  // [1 or 2, N, C]: sum of x over H*W, and (want_max) its max.
  at::Tensor (*pool)(const Geometry& geo, const at::Tensor& x, bool want_max);
  // out = out_act(s * x + residual); residual may be undefined.
  void (*scale)(const Geometry& geo, const at::Tensor& x, const at::Tensor& residual,
                const at::Tensor& s, bool relu, const at::Tensor& out);
  // [1 or 2, N, C]: ds = sum of dy * x, and (zmax defined) how many x equal zmax.
  // dy = grad_out, masked by out > 0 when out is defined (output ReLU).
  at::Tensor (*grad_reduce)(const Geometry& geo, const at::Tensor& grad_out, const at::Tensor& out,
                            const at::Tensor& x, const at::Tensor& zmax);
  // dx = dy * s + dx_avg + [x == zmax] * dx_max; dresidual = dy where defined.
  void (*grad_input)(const Geometry& geo, const at::Tensor& grad_out, const at::Tensor& out,
                     const at::Tensor& x, const at::Tensor& s, const at::Tensor& dx_avg,
                     const at::Tensor& zmax, const at::Tensor& dx_max, const at::Tensor& dx,
                     const at::Tensor& dresidual);
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
