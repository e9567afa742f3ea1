// Ops se_kernels_emu::forward / backward: the CUDA kernels' plan and launch (se_cuda.h) run
// on the emulator over CPU tensors, for tests/test_cuda_emulation.py; set_mode picks the
// emulator's schedule (../emulator.h), set_device the GPU the plans are made for (no
// default: the loader, build.py, sets the emulated device it defines).
//
// Callers pass x-shaped tensors already dense in the layout to use. Every buffer the kernels
// see (inputs, outputs, scratch) is copied into or allocated in a larger NaN-filled block:
// an unwritten output stays NaN, a read past a buffer's end brings NaN into the results,
// and a write past it is caught by checking the guard regions afterwards. The workspace's
// buffers are kWorkspaceGap elements apart, and those gaps are checked the same way. The
// buffers named in `misalign` ("all" for every one) start one element off 16-byte
// alignment, which must make the kernels choose their scalar paths.
#define SE_KERNELS_CUDA_EMULATION
#include "hooks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "../../../csrc/cuda/se_cuda_schedules.cuh"
#include "guarded_buffers.h"

namespace se_kernels::cuda::detail {
namespace {
DeviceInfo emulated_device{0, 0};  // set_device
}
DeviceInfo current_device_info() {
  TORCH_CHECK(emulated_device.sm_count > 0, "emulator: no device; call set_device(sm_count, "
              "l2_bytes) first");
  return emulated_device;
}
}  // namespace se_kernels::cuda::detail

namespace {

using se_emu_binding::GuardedBuffers;
using se_kernels::cuda::DType;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    case at::kFloat: return DType::Float;
    case at::kDouble: return DType::Double;
    default: TORCH_CHECK(false, "emulator: unsupported dtype ", t.scalar_type());
  }
  return DType::Float;
}

se_kernels::cuda::Problem problem_of(const at::Tensor& x, int64_t S, bool channels_last,
                                     const std::string& activation, const std::string& gate,
                                     const std::string& pool, const std::string& out_activation) {
  const se_kernels::Options opt{
      se_kernels::find_option(activation, se_kernels::kActivationNames).value(),
      se_kernels::find_option(gate, se_kernels::kGateNames).value(),
      se_kernels::find_option(pool, se_kernels::kPoolNames).value(),
      se_kernels::find_option(out_activation, se_kernels::kOutActivationNames).value()};
  return {dtype_of(x), x.size(0), x.size(1), x.size(2) * x.size(3), S, channels_last, opt};
}

// Plans the call, gives it its workspace, launches it (unless there is nothing to do) and
// checks the guards around every buffer: the tail of the forward and the backward op.
template <typename Args, typename PlanFn, typename LaunchFn>
void plan_and_launch(GuardedBuffers& buffers, const se_kernels::cuda::Problem& problem, Args& args,
                     const at::TensorOptions& acc, bool launch, PlanFn plan_fn,
                     LaunchFn launch_fn) {
  const auto plan = plan_fn(problem, args);
  at::Tensor ws = buffers.out({plan.workspace_elems}, false, acc, "workspace");
  args.workspace = ws.mutable_data_ptr();
  if (launch) launch_fn(plan, args, nullptr);
  buffers.check();
}

void set_device(int64_t sm_count, int64_t l2_bytes) {
  TORCH_CHECK(sm_count > 0 && l2_bytes > 0, "emulator: a device has SMs and an L2, got ",
              sm_count, " SMs and ", l2_bytes, " bytes");
  se_kernels::cuda::detail::emulated_device = {static_cast<int>(sm_count), l2_bytes};
}

void set_mode(const std::string& fibers, const std::string& ctas, int64_t resident, int64_t seed,
              bool snapshot) {
  se_emu::set_mode(fibers, ctas, resident, seed, snapshot);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const at::Tensor& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& residual, std::string activation, std::string gate,
    std::string pool, std::string out_activation, bool channels_last,
    std::vector<std::string> misalign) {
  const int64_t N = x_in.size(0), C = x_in.size(1), S = w1.size(0);
  se_kernels::cuda::detail::launch_log.clear();
  se_emu::vector_accesses = 0;
  const auto acc = x_in.options().dtype(x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  GuardedBuffers buffers(std::move(misalign));
  const at::Tensor x = buffers.in(x_in, channels_last, "x");
  const at::Tensor w1g = buffers.in(w1, false, "w1"), w2g = buffers.in(w2, false, "w2");
  const at::Tensor b1g = b1 ? buffers.in(*b1, false, "b1") : at::Tensor();
  const at::Tensor b2g = b2 ? buffers.in(*b2, false, "b2") : at::Tensor();
  const at::Tensor rg =
      residual ? buffers.in(*residual, channels_last, "residual") : at::Tensor();
  at::Tensor o = buffers.out(x_in.sizes(), channels_last, x_in.options(), "out");
  at::Tensor z = buffers.out({N, C}, false, acc, "z");
  at::Tensor zmax = pool != "avg" ? buffers.out({N, C}, false, acc, "zmax") : at::empty({0}, acc);
  at::Tensor a = buffers.out({N, S}, false, acc, "a");
  at::Tensor g = buffers.out({N, C}, false, acc, "g");

  se_kernels::cuda::ForwardArgs args{};
  args.x = x.const_data_ptr();
  args.w1 = w1g.const_data_ptr();
  args.b1 = b1g.defined() ? b1g.const_data_ptr() : nullptr;
  args.w2 = w2g.const_data_ptr();
  args.b2 = b2g.defined() ? b2g.const_data_ptr() : nullptr;
  args.residual = rg.defined() ? rg.const_data_ptr() : nullptr;
  args.out = o.mutable_data_ptr();
  args.z = z.mutable_data_ptr();
  args.zmax = pool != "avg" ? zmax.mutable_data_ptr() : nullptr;
  args.a = a.mutable_data_ptr();
  args.g = g.mutable_data_ptr();
  plan_and_launch(
      buffers, problem_of(x, S, channels_last, activation, gate, pool, out_activation), args, acc,
      N > 0, [](const auto& pb, const auto& in) { return se_kernels::cuda::plan_forward(pb, in); },
      [](const auto& plan, const auto& in, auto stream) {
        se_kernels::cuda::launch_forward(plan, in, stream);
      });
  return {o, z, zmax, a, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x_in, const std::optional<at::Tensor>& out_in,
    const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& z, const at::Tensor& zmax,
    const at::Tensor& a, const at::Tensor& g, std::string activation, std::string gate,
    std::string pool, std::string out_activation, bool residual_grad, bool channels_last,
    std::vector<std::string> misalign) {
  const int64_t N = x_in.size(0), C = x_in.size(1), S = w1.size(0);
  se_kernels::cuda::detail::launch_log.clear();
  se_emu::vector_accesses = 0;
  const auto acc = z.options();
  const bool relu = out_activation == "relu";
  GuardedBuffers buffers(std::move(misalign));
  const at::Tensor dy = buffers.in(grad_out, channels_last, "grad_out");
  const at::Tensor x = buffers.in(x_in, channels_last, "x");
  const at::Tensor o = relu ? buffers.in(*out_in, channels_last, "out") : at::Tensor();
  const at::Tensor w1g = buffers.in(w1, false, "w1"), w2g = buffers.in(w2, false, "w2");
  const at::Tensor zg = buffers.in(z, false, "z"), ag = buffers.in(a, false, "a");
  const at::Tensor gg = buffers.in(g, false, "g");
  const at::Tensor zmaxg = pool != "avg" ? buffers.in(zmax, false, "zmax") : at::Tensor();
  at::Tensor dx = buffers.out(x_in.sizes(), channels_last, x_in.options(), "dx");
  at::Tensor dres = relu && residual_grad
                        ? buffers.out(x_in.sizes(), channels_last, x_in.options(), "dresidual")
                        : at::empty({0}, x_in.options());
  at::Tensor dw1 = buffers.out({S, C}, false, w1.options(), "dw1");
  at::Tensor db1 = buffers.out({S}, false, w1.options(), "db1");
  at::Tensor dw2 = buffers.out({C, S}, false, w2.options(), "dw2");
  at::Tensor db2 = buffers.out({C}, false, w2.options(), "db2");

  se_kernels::cuda::BackwardArgs args{};
  args.grad_out = dy.const_data_ptr();
  args.x = x.const_data_ptr();
  args.out = relu ? o.const_data_ptr() : nullptr;
  args.w1 = w1g.const_data_ptr();
  args.w2 = w2g.const_data_ptr();
  args.z = zg.const_data_ptr();
  args.zmax = zmaxg.defined() ? zmaxg.const_data_ptr() : nullptr;
  args.a = ag.const_data_ptr();
  args.g = gg.const_data_ptr();
  args.dx = dx.mutable_data_ptr();
  args.dresidual = dres.numel() ? dres.mutable_data_ptr() : nullptr;
  args.dw1 = dw1.mutable_data_ptr();
  args.db1 = db1.mutable_data_ptr();
  args.dw2 = dw2.mutable_data_ptr();
  args.db2 = db2.mutable_data_ptr();
  plan_and_launch(
      buffers, problem_of(x, S, channels_last, activation, gate, pool, out_activation), args, acc,
      true, [](const auto& pb, const auto& in) { return se_kernels::cuda::plan_backward(pb, in); },
      [](const auto& plan, const auto& in, auto stream) {
        se_kernels::cuda::launch_backward(plan, in, stream);
      });
  return {dx, dw1, db1, dw2, db2, dres};
}

// The launches of the last forward or backward: (kernel code, CTAs) pairs, coded as in the
// trace (se_trace.h).
std::vector<int64_t> last_launches() { return se_kernels::cuda::detail::launch_log; }
// How many 16-byte loads and stores the last forward or backward made.
int64_t last_vector_accesses() { return se_emu::vector_accesses; }

}  // namespace

TORCH_LIBRARY(se_kernels_emu, m) {
  m.def("last_launches() -> int[]", &last_launches);
  m.def("last_vector_accesses() -> int", &last_vector_accesses);
  m.def("set_device(int sm_count, int l2_bytes) -> ()", &set_device);
  m.def("set_mode(str fibers, str ctas, int resident, int seed, bool snapshot) -> ()", &set_mode);
  m.def("forward(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? residual, "
        "str activation, str gate, str pool, str out_activation, bool channels_last, "
        "str[] misalign) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        &forward);
  m.def("backward(Tensor grad_out, Tensor x, Tensor? out, Tensor w1, Tensor w2, Tensor z, "
        "Tensor zmax, Tensor a, Tensor g, str activation, str gate, str pool, "
        "str out_activation, bool residual_grad, bool channels_last, str[] misalign) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        &backward);
}
