// The kernel for CPUs without AVX2 (and the reference for what the AVX2 build must equal).
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define FUSED_EMA_ISA isa_default
#include "lerp_kernel_impl.h"
