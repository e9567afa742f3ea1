// The stream ops on the emulator: se_kernels_emu::stream_reduce, stream_map,
// stream_grad_reduce and stream_grad_map, and the act tail's stream_act_*, with the schemas of se_kernels/_stream_ops.py
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
  // Plans and launches the op's pass over the guarded tensors with the kernels' arguments
  // `args` (stream_args by default), then checks the guards.
  template <typename Tensors, typename Args>
  void run(Tensors& t, Args args) {
    const auto acc = t.x.options().dtype(accumulate_type(t.x.scalar_type()));
    run_stream_args(
        t, args,
        [&](int64_t elems) {
          return buffers.out({elems}, false, acc, "workspace").mutable_data_ptr();
        },
        nullptr);
    buffers.check();
  }
  template <typename Tensors>
  void run(Tensors& t) {
    run(t, stream_args(t));
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

// The act tail's ops. Their arguments are taken after the guarded copies are in place.
void act_inputs(EmulatedCall& call, StreamActTensors& t) {
  call.input(t.grad_out, "grad_out");
  call.input(t.x, "x");
  call.input(t.in_scale, "in_scale");
  call.input(t.in_shift, "in_shift");
  call.input(t.scale, "scale");
  call.input(t.act_shift, "act_shift");
  call.input(t.x_scale, "x_scale");
  call.input(t.shift, "shift");
}

at::Tensor stream_act_reduce(const at::Tensor& x, const at::Tensor& in_scale,
                             const at::Tensor& in_shift, c10::string_view activation) {
  StreamActTensors t = prepare_stream_act_reduce(x, in_scale, in_shift, activation);
  EmulatedCall call(t.geo);
  act_inputs(call, t);
  call.output(t.sum, "sum");
  call.run(t, act_reduce_args(t));
  return t.sum;
}

at::Tensor stream_act_map(const at::Tensor& x, const at::Tensor& in_scale,
                          const at::Tensor& in_shift, c10::string_view activation,
                          const at::Tensor& scale) {
  StreamActTensors t = prepare_stream_act_map(x, in_scale, in_shift, activation, scale);
  EmulatedCall call(t.geo);
  act_inputs(call, t);
  call.output(t.out, "out");
  call.run(t, act_map_args(t));
  return t.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_act_grad_reduce(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& in_scale,
    const at::Tensor& in_shift, c10::string_view activation, bool statistics) {
  StreamActTensors t =
      prepare_stream_act_grad_reduce(grad_out, x, in_scale, in_shift, activation, statistics);
  EmulatedCall call(t.geo);
  act_inputs(call, t);
  call.output(t.sdyv, "sdyv");
  call.output(t.sdyd, "sdyd");
  call.output(t.sdydx, "sdydx");
  call.output(t.sd, "sd");
  call.output(t.sdx, "sdx");
  call.run(t, act_grad_reduce_args(t));
  return {t.sdyv, t.sdyd, t.sdydx, t.sd, t.sdx};
}

at::Tensor stream_act_grad_map(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& in_scale, const at::Tensor& in_shift,
                               c10::string_view activation, const at::Tensor& dy_scale,
                               const at::Tensor& act_shift,
                               const std::optional<at::Tensor>& x_scale,
                               const std::optional<at::Tensor>& shift) {
  StreamActTensors t = prepare_stream_act_grad_map(grad_out, x, in_scale, in_shift, activation,
                                                   dy_scale, act_shift, x_scale, shift);
  EmulatedCall call(t.geo);
  act_inputs(call, t);
  call.output(t.out, "dx");
  call.run(t, act_grad_map_args(t));
  return t.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels_emu, CPU, m) {
  m.impl("stream_reduce", &stream_reduce);
  m.impl("stream_map", &stream_map);
  m.impl("stream_grad_reduce", &stream_grad_reduce);
  m.impl("stream_grad_map", &stream_grad_map);
  m.impl("stream_act_reduce", &stream_act_reduce);
  m.impl("stream_act_map", &stream_act_map);
  m.impl("stream_act_grad_reduce", &stream_act_grad_reduce);
  m.impl("stream_act_grad_map", &stream_act_grad_map);
}
