// The interface between the torch glue (multi_lerp.cpp) and the vectorised kernels
// (lerp_kernel_impl.h, compiled once per instruction set). Raw pointers only, so the kernel
// files stay light to compile and never see a torch type they could inline under the wrong ISA.
#pragma once

#include <cstdint>

#include "../chunk_table.h"  // kMaxSets

// A hint only: compilers without the builtin (MSVC) simply do not prefetch.
#if defined(__GNUC__) || defined(__clang__)
#define FUSED_EMA_PREFETCH(address) __builtin_prefetch(address)
#else
#define FUSED_EMA_PREFETCH(address) ((void)(address))
#endif

namespace fused_ema::cpu {

enum class ScalarKind : int { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };

// Work is split at block boundaries, so a thread never shares a cache line of output with another.
constexpr int64_t kBlockElements = 64;

// One tensor of the chunk table. Tensor t owns blocks [first_block, first_block + blocks(numel)).
struct TableEntry {
  const void* model;
  int64_t numel;
  int64_t first_block;
  uint32_t tensor_index;  // the pair's position in the caller's list; seeds stochastic rounding
};

struct LerpArgs {
  const TableEntry* entries;
  int64_t num_entries;
  void* const* averages;           // averages[entry * sets + set]
  int64_t sets;
  const double* weights;           // one per set
  const uint32_t* rounding_keys;   // one per set, or nullptr for round-to-nearest
};

// Updates every element of blocks [begin_block, end_block) for every set. The stochastic variant
// (bfloat16 averages only) needs rounding_keys; select_kernel returns it when asked.
using RangeKernel = void (*)(const LerpArgs& args, int64_t begin_block, int64_t end_block);

namespace isa_default {
RangeKernel select_kernel(ScalarKind average, ScalarKind model, bool stochastic);
}
// nullptr when this build has no such variant (non-x86, or a compiler without target pragmas).
namespace isa_avx2 {
RangeKernel select_kernel(ScalarKind average, ScalarKind model, bool stochastic);
}
namespace isa_avx512 {
RangeKernel select_kernel(ScalarKind average, ScalarKind model, bool stochastic);
}

inline int64_t blocks_of(int64_t numel) {
  return (numel + kBlockElements - 1) / kBlockElements;
}

}  // namespace fused_ema::cpu
