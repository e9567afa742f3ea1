// One call as the cuda backend's planning code sees it: the dtype, the shapes and layout, the
// options, and the device's SM count and L2 size. The tiling, the plan and the workspace are
// functions of these alone, never of the data, so the plan of a call can be made on any
// machine (csrc/cuda_schedule.cpp) and matches what a GPU with that device runs. Free of CUDA
// and torch headers.
#pragma once

#include <cstdint>

#include "../se_options.h"

namespace se_kernels::cuda {

enum class DType { Half, BFloat16, Float, Double };

inline int64_t element_size(DType dtype) {
  switch (dtype) {
    case DType::Half:
    case DType::BFloat16: return 2;
    case DType::Float: return 4;
    case DType::Double: return 8;
  }
  return 0;
}
// Bytes of the accumulation dtype (fp32; fp64 for fp64).
inline int64_t acc_size(DType dtype) { return dtype == DType::Double ? 8 : 4; }

// One SE call's shapes and options. x is [N, C, H, W] with P = H * W, dense in NCHW or
// channels-last; w1 is [S, C], w2 is [C, S], both contiguous. `residual`: the forward adds
// one; the backward writes its gradient (only with an output ReLU, else it is grad_out).
struct Problem {
  DType dtype;
  int64_t N, C, P, S;
  bool channels_last;
  Options opt;
  bool residual;
};

struct DeviceInfo {
  int sm_count;
  int64_t l2_bytes;
};

}  // namespace se_kernels::cuda
