// The kernel compiled for AVX2 + FMA, chosen at run time when torch itself runs its AVX2 or
// AVX512 kernels (at::get_cpu_capability()), so our results round exactly as torch's lerp_ does.
// The ISA is set by a pragma for this file alone: setuptools gives every source the same flags.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#pragma GCC target("avx,avx2,fma,f16c")
#include "isa_avx2_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FUSED_EMA_ISA isa_avx2
#include "lerp_kernel_impl.h"
#else
#include "lerp_kernel.h"
namespace fused_ema::cpu::isa_avx2 {
RangeKernel select_kernel(ScalarKind, ScalarKind, bool) {
  return nullptr;
}
}  // namespace fused_ema::cpu::isa_avx2
#endif
