// The CPU kernels with the compiler's baseline flags: they run on any CPU.
#define SE_CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"
#include "stream_impl.h"
