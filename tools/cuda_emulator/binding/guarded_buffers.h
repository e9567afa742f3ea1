// The buffers the emulated ops hand the kernels: every input copied into, every output
// allocated in, a larger NaN-filled block, registered with the emulator for its checks of
// 16-byte accesses. An unwritten output stays NaN, a read past a buffer's end brings NaN into
// the results, and check() finds a write past it in the guards afterwards (and in the gaps
// between a workspace's buffers). Buffers named in `misalign` ("all" for every one) start
// one element off 16-byte alignment.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/masked_select.h>
#include <ATen/ops/ones.h>

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../emulator.h"

namespace se_emu_binding {

constexpr int64_t kGuard = 64;  // elements of NaN before and after every buffer

struct Guarded {
  at::Tensor block;  // 1-D, guards included
  at::Tensor view;   // what the kernels see
  int64_t begin, numel;
};

// A NaN-filled buffer of `sizes`, dense NCHW or (channels_last) NHWC-ordered, inside guards.
inline Guarded guarded(at::IntArrayRef sizes, bool channels_last,
                       const at::TensorOptions& options, int64_t misalign) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  Guarded g;
  g.begin = kGuard + misalign;
  g.numel = numel;
  g.block = at::full({numel + 2 * kGuard + misalign}, std::numeric_limits<double>::quiet_NaN(),
                     options);
  at::Tensor flat = g.block.narrow(0, g.begin, numel);
  if (channels_last && sizes.size() == 4) {
    g.view = flat.view({sizes[0], sizes[2], sizes[3], sizes[1]}).permute({0, 3, 1, 2});
  } else {
    g.view = flat.view(sizes);
  }
  return g;
}

inline Guarded guarded_copy(const at::Tensor& t, bool channels_last, int64_t misalign) {
  Guarded g = guarded(t.sizes(), channels_last, t.options(), misalign);
  g.view.copy_(t);
  return g;
}

inline void check_guards(const Guarded& g, const char* name) {
  const bool front = at::isnan(g.block.narrow(0, 0, g.begin)).all().item<bool>();
  const int64_t end = g.begin + g.numel;
  const bool back =
      at::isnan(g.block.narrow(0, end, g.block.numel() - end)).all().item<bool>();
  TORCH_CHECK(front && back, "emulator: a kernel wrote outside ", name);
}

// Every buffer one op call hands the kernels, registered with the emulator for its checks
// of 16-byte accesses and kept so their guards can be checked after the call.
struct GuardedBuffers {
  std::vector<std::string> misalign;
  std::vector<std::pair<Guarded, const char*>> all;

  explicit GuardedBuffers(std::vector<std::string> shifted) : misalign(std::move(shifted)) {
    se_emu::clear_buffers();
  }
  ~GuardedBuffers() { se_emu::clear_buffers(); }

  int64_t shift(const char* name) const {
    for (const auto& m : misalign)
      if (m == name || m == "all") return 1;
    return 0;
  }
  at::Tensor add(Guarded g, const char* name) {
    se_emu::add_buffer(name, static_cast<const char*>(g.block.const_data_ptr()) +
                                 g.begin * g.block.element_size(),
                       g.numel * g.block.element_size());
    all.emplace_back(std::move(g), name);
    return all.back().first.view;
  }
  at::Tensor in(const at::Tensor& t, bool channels_last, const char* name) {
    return add(guarded_copy(t, channels_last, shift(name)), name);
  }
  at::Tensor out(at::IntArrayRef sizes, bool channels_last, const at::TensorOptions& options,
                 const char* name) {
    return add(guarded(sizes, channels_last, options, shift(name)), name);
  }
  // Guards of every buffer; for the workspace, also the gaps between its buffers (the
  // workspace.* regions the kernels' host code registered).
  void check() const {
    for (const auto& [buffer, name] : all) {
      check_guards(buffer, name);
      if (std::string(name) != "workspace") continue;
      const int64_t esize = buffer.block.element_size();
      const auto base = reinterpret_cast<uintptr_t>(buffer.view.const_data_ptr());
      at::Tensor gap = at::ones({buffer.numel}, buffer.block.options().dtype(at::kBool));
      for (const se_emu::Buffer& region : se_emu::buffers)
        if (region.name.rfind("workspace.", 0) == 0)
          gap.narrow(0, static_cast<int64_t>(region.begin - base) / esize,
                     static_cast<int64_t>(region.end - region.begin) / esize)
              .fill_(false);
      TORCH_CHECK(at::isnan(buffer.view.masked_select(gap)).all().item<bool>(),
                  "emulator: a kernel wrote into a gap between the workspace's buffers");
    }
  }
};

}  // namespace se_emu_binding
