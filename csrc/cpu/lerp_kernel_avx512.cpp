// The kernel compiled for AVX512 (F, BW, VL, DQ), chosen at run time when torch itself runs its
// AVX512 kernels (at::get_cpu_capability()). Twice the lanes of the AVX2 build for the
// compute-heavy paths (bfloat16 conversions, the stochastic-rounding hash); same roundings.
// The ISA is set by a pragma for this file alone: setuptools gives every source the same flags.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#include "isa_avx2_macros.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FUSED_EMA_ISA isa_avx512
#include "lerp_kernel_impl.h"
#else
#include "lerp_kernel.h"
namespace fused_ema::cpu::isa_avx512 {
RangeKernel select_kernel(ScalarKind, ScalarKind, bool) {
  return nullptr;
}
}  // namespace fused_ema::cpu::isa_avx512
#endif
