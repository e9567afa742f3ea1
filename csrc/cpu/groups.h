// Sample groups of the CPU ops that make two passes over x: each group's second pass finds
// the group's inputs still in cache.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>

namespace se_kernels::cpu {

// Samples per group: the passes over one group run back to back, so the second finds the
// group's inputs still in the last-level cache. Each group also reads the excitation's
// weights, so a group is never so small that weight traffic rivals the traffic it saves on
// x.
inline int64_t samples_per_group(int64_t N, int64_t bytes_per_sample, int64_t weight_bytes) {
  constexpr int64_t kGroupBytes = int64_t{4} << 20;  // well inside a server L3
  constexpr int64_t kWeightRatio = 8;
  const int64_t per_sample = std::max<int64_t>(1, bytes_per_sample);
  const int64_t fits = kGroupBytes / per_sample;
  const int64_t amortizes = (kWeightRatio * weight_bytes + per_sample - 1) / per_sample;
  return std::clamp<int64_t>(std::max(fits, amortizes), 1, std::max<int64_t>(1, N));
}

// Sample n0 / row n0 of a dense tensor (nullptr for an undefined one).
inline const void* at_sample(const at::Tensor& t, int64_t n0) {
  return t.defined() ? static_cast<const char*>(t.const_data_ptr()) + n0 * t.stride(0) * t.element_size()
                     : nullptr;
}
inline void* at_sample(at::Tensor& t, int64_t n0) {
  return t.defined() ? static_cast<char*>(t.data_ptr()) + n0 * t.stride(0) * t.element_size() : nullptr;
}

}  // namespace se_kernels::cpu
