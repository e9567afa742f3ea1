// The environment variables that steer the cuda backend's plan: the schedule
// (SE_KERNELS_CUDA_SCHEDULE), the pipelined grid's CTAs per SM (SE_KERNELS_CUDA_CTAS_PER_SM)
// and the L2 budget that sizes sample groups (SE_KERNELS_CUDA_GROUP_BYTES). Every plan reads
// them afresh (se_plan.h's make_plan), so tests and GPU measurements can switch them between
// calls; an invalid value fails the call that reads it. Free of CUDA and torch headers
// (c10's checks only).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>

namespace se_kernels::cuda {
namespace detail {

// pipelined (default): per call one kernel that zeroes the sync counters, one persistent
//   kernel that runs every stage of every sample group as work items taken in ticket order,
//   and (backward) the weight-gradient kernels. Launches do not grow with N.
// grouped: per L2-sized group, one launch per stage (reduce [+ combine], two MLP products,
//   map). Kept for comparison on a GPU: SE_KERNELS_CUDA_SCHEDULE=grouped.
enum class Schedule { Pipelined, Grouped };

inline Schedule schedule_from_env() {
  const char* env = std::getenv("SE_KERNELS_CUDA_SCHEDULE");
  if (env == nullptr || *env == '\0' || std::string_view(env) == "pipelined")
    return Schedule::Pipelined;
  TORCH_CHECK(std::string_view(env) == "grouped",
              "se_kernels: SE_KERNELS_CUDA_SCHEDULE must be 'pipelined' or 'grouped', got '",
              env, "'");
  return Schedule::Grouped;
}

// CTAs per SM of the pipelined schedule's persistent grid, which is also the minimum that
// its kernel's __launch_bounds__ promises: 2 (default) caps a thread at 128 registers, and
// the backward spills; 1 lets it use up to 255, spilling little or nothing, at half the
// resident warps. SE_KERNELS_CUDA_CTAS_PER_SM=1 selects the latter, so a GPU can measure
// which costs less (DESIGN.md §3.1).
inline int pipeline_ctas_per_sm_from_env() {
  const char* env = std::getenv("SE_KERNELS_CUDA_CTAS_PER_SM");
  if (env == nullptr || *env == '\0' || std::string_view(env) == "2") return 2;
  TORCH_CHECK(std::string_view(env) == "1",
              "se_kernels: SE_KERNELS_CUDA_CTAS_PER_SM must be '1' or '2', got '", env, "'");
  return 1;
}

// The L2 budget: bytes the pipeline may touch between a group's first read and its re-read.
// SE_KERNELS_CUDA_GROUP_BYTES overrides it (tests use it to force many groups; 0 or less
// puts the whole batch in one group).
inline int64_t l2_budget(int64_t l2_bytes) {
  const char* env = std::getenv("SE_KERNELS_CUDA_GROUP_BYTES");
  if (env != nullptr && *env != '\0') return std::atoll(env);
  return l2_bytes / 2;
}

}  // namespace detail
}  // namespace se_kernels::cuda
