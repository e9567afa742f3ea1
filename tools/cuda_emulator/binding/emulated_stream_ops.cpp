// The stream ops on the emulator: se_kernels_emu::stream_reduce, stream_map,
// stream_grad_reduce and stream_grad_map, with the schemas of se_kernels/_stream_ops.py
// (build.py defines them from there) over CPU tensors. Each runs what the CUDA op runs
// (csrc/cuda/se_cuda.cpp): the same argument checks and prepared tensors (se_common.h), the
// same plan and launch (se_stream.h), with every buffer handed to the kernels a guarded
// copy (guarded_buffers.h). An input keeps its own 16-byte misalignment there, so a
// misaligned input reaches the kernels misaligned, as on a GPU.
#define SE_KERNELS_CUDA_EMULATION
#include "hooks.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../../../csrc/cuda/se_cuda_tensors.h"
#include "guarded_buffers.h"

namespace {

using namespace se_kernels;

// One emulated call: the launch log and the vector-access count start afresh, and the
// prepared tensors are swapped for guarded ones before their pointers reach the kernels.
struct EmulatedCall {
  se_emu_binding::GuardedBuffers buffers{{}};
  bool channels_last;

  explicit EmulatedCall(const Geometry& geo) : channels_last(geo.channels_last) {
    cuda::detail::launch_log.clear();
    se_emu::vector_accesses = 0;
  }
  void input(at::Tensor& t, const char* name) {
    if (!t.defined()) return;
    if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0)
      buffers.misalign.emplace_back(name);
    t = buffers.in(t, channels_last, name);
  }
  // An output; a [0] one is not asked for and reaches no kernel.
  void output(at::Tensor& t, const char* name) {
    if (t.dim() == 1 && t.size(0) == 0) return;
    t = buffers.out(t.sizes(), channels_last, t.options(), name);
  }
  // Plans and launches the op's pass over the guarded tensors, then checks the guards.
  template <typename Tensors>
  void run(Tensors& t) {
    const auto acc = t.x.options().dtype(accumulate_type(t.x.scalar_type()));
    run_stream(
        t,
        [&](int64_t elems) {
          return buffers.out({elems}, false, acc, "workspace").mutable_data_ptr();
        },
        nullptr);
    buffers.check();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_reduce(const at::Tensor& x,
                                                                         bool squares,
                                                                         bool maxima,
                                                                         bool minima) {
  StreamReduceTensors t = prepare_stream_reduce(x, squares, maxima, minima);
  EmulatedCall call(t.geo);
  call.input(t.x, "x");
  call.output(t.sum, "sum");
  call.output(t.sumsq, "sumsq");
  call.output(t.max, "max");
  call.output(t.min, "min");
  call.run(t);
  return {t.sum, t.sumsq, t.max, t.min};
}

at::Tensor stream_map(const at::Tensor& x, const at::Tensor& scale,
                      const std::optional<at::Tensor>& shift,
                      const std::optional<at::Tensor>& residual, c10::string_view out_activation) {
  StreamMapTensors t = prepare_stream_map(x, scale, shift, residual, out_activation);
  EmulatedCall call(t.geo);
  call.input(t.x, "x");
  call.input(t.scale, "scale");
  call.input(t.shift, "shift");
  call.input(t.residual, "residual");
  call.output(t.out, "out");
  call.run(t);
  return t.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_grad_reduce(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& x,
    const std::optional<at::Tensor>& peak, c10::string_view out_activation, bool sum_dy,
    bool residual_grad) {
  StreamGradReduceTensors t = prepare_stream_grad_reduce(grad_out, out, x, peak, out_activation,
                                                         sum_dy, residual_grad);
  EmulatedCall call(t.geo);
  call.input(t.grad_out, "grad_out");
  call.input(t.out, "out");
  call.input(t.x, "x");
  call.input(t.peak, "peak");
  call.output(t.sdy, "sdy");
  call.output(t.sdyx, "sdyx");
  call.output(t.count, "count");
  call.output(t.dresidual, "dresidual");
  call.run(t);
  return {t.sdy, t.sdyx, t.count, t.dresidual};
}

at::Tensor stream_grad_map(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                           const at::Tensor& x, const at::Tensor& dy_scale,
                           const std::optional<at::Tensor>& x_scale,
                           const std::optional<at::Tensor>& shift,
                           const std::optional<at::Tensor>& peak,
                           const std::optional<at::Tensor>& peak_shift,
                           c10::string_view out_activation) {
  StreamGradMapTensors t = prepare_stream_grad_map(grad_out, out, x, dy_scale, x_scale, shift,
                                                   peak, peak_shift, out_activation);
  EmulatedCall call(t.geo);
  call.input(t.grad_out, "grad_out");
  call.input(t.out, "out");
  call.input(t.x, "x");
  call.input(t.dy_scale, "dy_scale");
  call.input(t.x_scale, "x_scale");
  call.input(t.shift, "shift");
  call.input(t.peak, "peak");
  call.input(t.peak_shift, "peak_shift");
  call.output(t.dx, "dx");
  call.run(t);
  return t.dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels_emu, CPU, m) {
  m.impl("stream_reduce", &stream_reduce);
  m.impl("stream_map", &stream_map);
  m.impl("stream_grad_reduce", &stream_grad_reduce);
  m.impl("stream_grad_map", &stream_grad_map);
}
