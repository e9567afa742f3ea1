// se_kernels::fc_layer and fc_layer_backward on CPU tensors (se_kernels/_fc_ops.py): a fully
// connected layer's products on the excitation's small [N, K] rows, through the MLP's
// register tiles (mlp_impl.h), which need no packing of the weight: at batch 8 or 32 with a
// 2048 x 128 weight, a BLAS call spends as long copying the operands into its panels as
// multiplying them. Arguments are checked and outputs allocated by se_common's
// prepare_fc_layer*.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../se_common.h"
#include "kernels.h"

namespace se_kernels {

namespace {

// The operands as the kernels take them, from prepare_fc_layer's or its backward's tensors.
template <typename Tensors>
cpu::FcLayerOperands operands(const Tensors& t) {
  return {t.x.scalar_type(), t.N, t.K, t.R, t.x.const_data_ptr(), t.weight.const_data_ptr()};
}

at::Tensor fc_layer_cpu(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  FcLayerTensors t = prepare_fc_layer(x, weight, bias);
  cpu::kernels().fc_layer(
      {operands(t), t.bias.defined() ? t.bias.const_data_ptr() : nullptr, t.y.data_ptr()});
  return t.y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fc_layer_backward_cpu(const at::Tensor& grad,
                                                                     const at::Tensor& x,
                                                                     const at::Tensor& weight,
                                                                     bool bias) {
  FcLayerGradTensors t = prepare_fc_layer_backward(grad, x, weight, bias);
  cpu::kernels().fc_layer_backward({operands(t), t.grad.const_data_ptr(), t.dx.data_ptr(),
                                    t.dweight.data_ptr(), bias ? t.dbias.data_ptr() : nullptr});
  return {t.dx, t.dweight, t.dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(se_kernels, CPU, m) {
  m.impl("fc_layer", &fc_layer_cpu);
  m.impl("fc_layer_backward", &fc_layer_backward_cpu);
}

}  // namespace se_kernels
