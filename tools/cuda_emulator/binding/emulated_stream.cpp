// csrc/cuda/se_stream.cu compiled as host code on the emulator (see ../emulator.h).
#define SE_KERNELS_CUDA_EMULATION
#include "hooks.h"
#include "../../../csrc/cuda/se_stream.cu"
