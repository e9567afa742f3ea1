// The hooks csrc/cuda/ leaves to an emulated build (compiled with SE_KERNELS_CUDA_EMULATION
// defined): the launch path of se_cuda_launch.cuh, its spin-wait primitives, and the
// workspace gaps of se_workspace.h. Included, with ../emulator.h, before the kernels' sources.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../emulator.h"

namespace se_kernels::cuda::detail {

using ::se_emu::load_acquire;
inline void spin_pause() {}

// Extra workspace elements between the buffers a workspace holds: the binding leaves them
// NaN and checks them afterwards, so an over-read or over-write of one buffer shows.
constexpr int64_t kWorkspaceGap = 64;
inline void workspace_region(const char* name, const void* begin, int64_t bytes) {
  if (bytes > 0) se_emu::add_buffer(std::string("workspace.") + name, begin, bytes);
}

// Every launch since the log was last cleared: (kernel code of the plan's trace, CTAs).
inline std::vector<int64_t> launch_log;

// The launch of se_cuda_launch.cuh without `<<<>>>`: logged, then run on the emulator.
template <typename What, typename... Params, typename... Args>
void emulated_launch(What what, void (*kernel)(Params...), int64_t ctas, int threads,
                     const Args&... args) {
  launch_log.insert(launch_log.end(), {static_cast<int64_t>(what), ctas});
  se_emu::launch(kernel, ctas, threads, args...);
}

}  // namespace se_kernels::cuda::detail
