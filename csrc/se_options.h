// The SE op's options, shared by the CPU and CUDA code: free of torch headers so that the
// torch-free CUDA sources and the CUDA emulator include it as they are.
//
// Names and codes are those of se_kernels/options.py (the Python side, whose codes the
// Triton kernels take); tests/test_options.py reads this file and checks that both agree.
// The math behind each option is in DESIGN.md §1. Code that computes an option switches over
// it with one case per value and no default: the build's -Werror=switch makes a value without
// its case a compile error, never a silent fall into another value's math.
#pragma once

#include <cstddef>
#include <optional>
#include <string_view>

namespace se_kernels {

enum class Activation : int {
  ReLU = 0,
  SiLU = 1,
  GELU = 2,
  GELUTanh = 3,
  HardSwish = 4,
  LeakyReLU = 5
};
enum class Gate : int { Sigmoid = 0, HardSigmoid = 1, Tanh = 2, ReLU = 3 };
enum class Pool : int { Avg = 0, Max = 1, AvgMax = 2 };
enum class OutActivation : int { None = 0, ReLU = 1 };

// The squeeze's weights: z = avg·mean_p(x) + max·max_p(x) (DESIGN.md §1.2's w_avg, w_max).
struct PoolWeights {
  double avg, max;
};
constexpr PoolWeights pool_weights(Pool pool) {
  switch (pool) {
    case Pool::Avg: return {1.0, 0.0};
    case Pool::Max: return {0.0, 1.0};
    case Pool::AvgMax: return {0.5, 0.5};
  }
  return {0.0, 0.0};  // not reached: the switch covers every Pool
}

struct Options {
  Activation activation;
  Gate gate;
  Pool pool;
  OutActivation out_activation;

  constexpr bool uses_avg() const { return pool_weights(pool).avg != 0.0; }
  constexpr bool uses_max() const { return pool_weights(pool).max != 0.0; }
  constexpr bool out_relu() const { return out_activation == OutActivation::ReLU; }
};

// How the API and the ops' schemas spell each option.
template <typename Enum>
struct OptionName {
  const char* name;
  Enum value;
};
inline constexpr OptionName<Activation> kActivationNames[] = {
    {"relu", Activation::ReLU},
    {"silu", Activation::SiLU},
    {"gelu", Activation::GELU},
    {"gelu_tanh", Activation::GELUTanh},
    {"hardswish", Activation::HardSwish},
    {"leaky_relu", Activation::LeakyReLU}};
inline constexpr OptionName<Gate> kGateNames[] = {{"sigmoid", Gate::Sigmoid},
                                                  {"hardsigmoid", Gate::HardSigmoid},
                                                  {"tanh", Gate::Tanh},
                                                  {"relu", Gate::ReLU}};

// The constants of the GELU forms (DESIGN.md §1.3), written once for the CPU and CUDA code.
inline constexpr double kSqrtHalf = 0.70710678118654752440;     // 1/sqrt(2)
inline constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/sqrt(2 pi)
inline constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2/pi)
inline constexpr double kGeluTanhCubic = 0.044715;
// leaky_relu's negative slope: nn.LeakyReLU's default (se_kernels.options.LEAKY_RELU_SLOPE).
inline constexpr double kLeakyReluSlope = 0.01;
inline constexpr OptionName<Pool> kPoolNames[] = {
    {"avg", Pool::Avg}, {"max", Pool::Max}, {"avgmax", Pool::AvgMax}};
inline constexpr OptionName<OutActivation> kOutActivationNames[] = {
    {"none", OutActivation::None}, {"relu", OutActivation::ReLU}};

// The option called `name`, or nothing when no option is.
template <typename Enum, std::size_t K>
constexpr std::optional<Enum> find_option(std::string_view name,
                                          const OptionName<Enum> (&names)[K]) {
  for (const auto& option : names)
    if (name == option.name) return option.value;
  return std::nullopt;
}

}  // namespace se_kernels
