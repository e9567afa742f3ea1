// The CPU kernels compiled with -mavx2 -mfma -mf16c (setup.py builds this file on x86-64
// into a separate library with those flags; CMakeLists.txt sets them on this file only).
// ATen's vector types then use 256-bit intrinsics; kernels() picks this table at run time
// only on CPUs that have AVX2.
#if !defined(CPU_CAPABILITY_AVX2) || !defined(__AVX2__)
#error "kernels_avx2.cpp must be compiled with -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2"
#endif
#define SE_CPU_CAPABILITY AVX2
#include "kernels_impl.h"
#include "stream_impl.h"
