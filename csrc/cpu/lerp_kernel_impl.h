// The kernel body, compiled once per instruction set: lerp_kernel_default.cpp and
// lerp_kernel_avx2.cpp include it inside their own namespace (FUSED_EMA_ISA) after choosing
// at::vec's CPU_CAPABILITY, the way ATen compiles its own kernels once per capability.
//
// Numerics follow ATen's CPU lerp exactly: compute in float (double when either side is double),
// weight rounded to the compute type first, then fmadd(coeff, model - average, base) with
// (coeff, base) = (w, average) when |w| < 0.5 and (w - 1, model) otherwise; one rounding on store.
// Stochastic rounding of bfloat16 averages follows fused_ema/rounding.py bit for bit.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // false positives in GCC's AVX512 intrinsics
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../rounding.h"
#include "lerp_kernel.h"

namespace fused_ema::cpu::FUSED_EMA_ISA {
namespace {

using at::vec::Vectorized;
using c10::BFloat16;
using c10::Half;

// Elements per inner step: one Vectorized<BFloat16> widens to two Vectorized<float>.
constexpr int kStep = 2 * Vectorized<float>::size();
static_assert(kBlockElements % kStep == 0, "a block must hold whole steps");
static_assert(Vectorized<BFloat16>::size() == kStep && Vectorized<Half>::size() == kStep);

// ATen's opmath type for a lerp of these two dtypes.
template <typename A, typename M>
using compute_t = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<M, double>, double, float>;

template <typename C>
constexpr int kVectors = kStep / Vectorized<C>::size();

// kStep elements of T, widened to the compute type C.
template <typename T, typename C>
inline void load_step(const T* source, Vectorized<C>* out) {
  if constexpr (std::is_same_v<T, C>) {
    for (int j = 0; j < kVectors<C>; ++j) {
      out[j] = Vectorized<C>::loadu(source + j * Vectorized<C>::size());
    }
  } else if constexpr (std::is_same_v<C, float>) {
    auto [low, high] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(source));
    out[0] = low;
    out[1] = high;
  } else {
    // float64 compute with a narrower side: rare (float64 averages of float32 models), kept simple.
    alignas(64) double wide[kStep];
    for (int i = 0; i < kStep; ++i) {
      wide[i] = static_cast<double>(static_cast<float>(source[i]));
    }
    for (int j = 0; j < kVectors<C>; ++j) {
      out[j] = Vectorized<C>::loadu(wide + j * Vectorized<C>::size());
    }
  }
}

// rounding.py's rule on float32 values: add 16 random bits below bfloat16's last bit, truncate.
// Inf and nan keep their value, and the bfloat16 conversion that follows rounds them to nearest
// as the reference does. Values that leave here have zero low bits, so that conversion is exact.
inline void stochastic_round_(float* values, uint32_t stream, uint32_t first_element) {
  alignas(64) uint32_t bits[kStep];
  std::memcpy(bits, values, sizeof(bits));
  // (first + i) * M as first * M + i * M: the per-lane products are constants, so the vectorised
  // loop adds instead of multiplying.
  const uint32_t first_product = first_element * kElementMultiplier;
  for (int i = 0; i < kStep; ++i) {
    const uint32_t random = fmix32(stream ^ (first_product + static_cast<uint32_t>(i) * kElementMultiplier)) >> 16;
    const bool finite = (bits[i] & 0x7F800000u) != 0x7F800000u;
    bits[i] = finite ? ((bits[i] + random) & 0xFFFF0000u) : bits[i];
  }
  std::memcpy(values, bits, sizeof(bits));
}

// Stochastic rounding is a template parameter (kStochastic): a run-time flag tested in the
// inner loop cost the plain bfloat16 path a tenth of its speed.
template <typename A, typename C, bool kStochastic>
inline void store_step(A* target, const Vectorized<C>* values, uint32_t stream, uint32_t first_element) {
  if constexpr (std::is_same_v<A, C>) {
    for (int j = 0; j < kVectors<C>; ++j) {
      values[j].store(target + j * Vectorized<C>::size());
    }
  } else if constexpr (std::is_same_v<C, float>) {
    Vectorized<float> low = values[0], high = values[1];
    if constexpr (kStochastic) {
      alignas(64) float narrow[kStep];
      low.store(narrow);
      high.store(narrow + Vectorized<float>::size());
      stochastic_round_(narrow, stream, first_element);
      low = Vectorized<float>::loadu(narrow);
      high = Vectorized<float>::loadu(narrow + Vectorized<float>::size());
    }
    at::vec::convert_from_float<A>(low, high).store(target);
  } else {
    alignas(64) double wide[kStep];
    for (int j = 0; j < kVectors<C>; ++j) {
      values[j].store(wide + j * Vectorized<C>::size());
    }
    if constexpr (kStochastic) {
      // The reference rounds the float64 result to float32 first, then stochastically.
      alignas(64) float narrow[kStep];
      for (int i = 0; i < kStep; ++i) {
        narrow[i] = static_cast<float>(wide[i]);
      }
      stochastic_round_(narrow, stream, first_element);
      at::vec::convert_from_float<A>(Vectorized<float>::loadu(narrow),
                                     Vectorized<float>::loadu(narrow + Vectorized<float>::size()))
          .store(target);
    } else {
      for (int i = 0; i < kStep; ++i) {
        target[i] = static_cast<A>(wide[i]);
      }
    }
  }
}

// One set's weight in ATen's form: result = fmadd(coeff, model - average, base average or model).
template <typename C>
struct SetWeight {
  Vectorized<C> coeff;
  bool from_average;
};

// kStep elements at `offset` of one set; `element_index` is their offset in the tensor.
template <typename A, typename M, bool kStochastic>
inline void lerp_step(A* average, const M* model, const SetWeight<compute_t<A, M>>& weight, uint32_t stream,
                      int64_t offset, int64_t element_index) {
  using C = compute_t<A, M>;
  Vectorized<C> model_values[kVectors<C>];
  Vectorized<C> values[kVectors<C>];
  load_step<M, C>(model + offset, model_values);
  load_step<A, C>(average + offset, values);
  for (int j = 0; j < kVectors<C>; ++j) {
    const Vectorized<C> base = weight.from_average ? values[j] : model_values[j];
    values[j] = at::vec::fmadd(weight.coeff, model_values[j] - values[j], base);
  }
  store_step<A, C, kStochastic>(average + offset, values, stream, static_cast<uint32_t>(element_index));
}

// Several sets walk the same model span one after another, so the model is read from memory once
// and from L1 for the other sets, while each set streams through its own average.
constexpr int64_t kSpanElements = 1024;

// Small tensors are separate allocations, each a new stream the hardware prefetcher must discover;
// touching the next tensors' first lines ahead of time hides that latency.
constexpr int64_t kPrefetchTensorsAhead = 4;
constexpr int64_t kPrefetchBytes = 2048;

inline void prefetch_lines(const void* data, int64_t bytes) {
  const char* bytes_begin = static_cast<const char*>(data);
  for (int64_t offset = 0; offset < std::min(bytes, kPrefetchBytes); offset += 64) {
    FUSED_EMA_PREFETCH(bytes_begin + offset);
  }
}

template <typename A, typename M, bool kStochastic>
void lerp_range(const LerpArgs& args, int64_t begin_block, int64_t end_block) {
  using C = compute_t<A, M>;
  SetWeight<C> weights[kMaxSets];
  for (int64_t set = 0; set < args.sets; ++set) {
    const C weight = static_cast<C>(args.weights[set]);
    const bool small = std::abs(weight) < C(0.5);
    weights[set] = {Vectorized<C>(small ? weight : weight - C(1)), small};
  }
  const TableEntry* const entries_end = args.entries + args.num_entries;
  // The last entry starting at or before begin_block owns it (empty tensors own no block).
  const TableEntry* entry = std::upper_bound(args.entries, entries_end, begin_block,
                                             [](int64_t block, const TableEntry& e) { return block < e.first_block; }) - 1;
  A* averages[kMaxSets];
  uint32_t streams[kMaxSets];
  for (int64_t block = begin_block; block < end_block && entry < entries_end; ++entry) {
    const int64_t entry_end_block = entry->first_block + blocks_of(entry->numel);
    if (entry_end_block <= block) {
      continue;
    }
    const int64_t begin = (block - entry->first_block) * kBlockElements;
    const int64_t end = std::min(entry->numel, (std::min(end_block, entry_end_block) - entry->first_block) * kBlockElements);
    block = std::min(end_block, entry_end_block);
    const int64_t row = entry - args.entries;
    if (row + kPrefetchTensorsAhead < args.num_entries) {
      const TableEntry& ahead = entry[kPrefetchTensorsAhead];
      prefetch_lines(ahead.model, ahead.numel * static_cast<int64_t>(sizeof(M)));
      for (int64_t set = 0; set < args.sets; ++set) {
        prefetch_lines(args.averages[(row + kPrefetchTensorsAhead) * args.sets + set],
                       ahead.numel * static_cast<int64_t>(sizeof(A)));
      }
    }
    for (int64_t set = 0; set < args.sets; ++set) {
      averages[set] = static_cast<A*>(args.averages[row * args.sets + set]);
      if constexpr (kStochastic) {
        streams[set] = rounding_stream(args.rounding_keys[set], entry->tensor_index);
      }
    }
    const M* model = static_cast<const M*>(entry->model);
    const int64_t full_end = begin + (end - begin) / kStep * kStep;
    for (int64_t span = begin; span < full_end; span += kSpanElements) {
      const int64_t span_end = std::min(full_end, span + kSpanElements);
      for (int64_t set = 0; set < args.sets; ++set) {
        for (int64_t offset = span; offset < span_end; offset += kStep) {
          lerp_step<A, M, kStochastic>(averages[set], model, weights[set], streams[set], offset, offset);
        }
      }
    }
    if (full_end < end) {
      // The tail of a tensor: run the same vector code on padded copies so every element gets
      // identical arithmetic, then copy the valid part back.
      const int64_t count = end - full_end;
      alignas(64) M model_tail[kStep] = {};
      alignas(64) A average_tail[kStep];
      std::memcpy(model_tail, model + full_end, count * sizeof(M));
      for (int64_t set = 0; set < args.sets; ++set) {
        std::memset(average_tail, 0, sizeof(average_tail));
        std::memcpy(average_tail, averages[set] + full_end, count * sizeof(A));
        lerp_step<A, M, kStochastic>(average_tail, model_tail, weights[set], streams[set], 0, full_end);
        std::memcpy(averages[set] + full_end, average_tail, count * sizeof(A));
      }
    }
  }
}

template <typename A, bool kStochastic>
RangeKernel select_for_average(ScalarKind model) {
  switch (model) {
    case ScalarKind::Float: return &lerp_range<A, float, kStochastic>;
    case ScalarKind::Double: return &lerp_range<A, double, kStochastic>;
    case ScalarKind::Half: return &lerp_range<A, Half, kStochastic>;
    case ScalarKind::BFloat16: return &lerp_range<A, BFloat16, kStochastic>;
  }
  return nullptr;
}

}  // namespace

RangeKernel select_kernel(ScalarKind average, ScalarKind model, bool stochastic) {
  switch (average) {
    case ScalarKind::Float: return select_for_average<float, false>(model);
    case ScalarKind::Double: return select_for_average<double, false>(model);
    case ScalarKind::Half: return select_for_average<Half, false>(model);
    case ScalarKind::BFloat16:
      return stochastic ? select_for_average<BFloat16, true>(model) : select_for_average<BFloat16, false>(model);
  }
  return nullptr;
}

}  // namespace fused_ema::cpu::FUSED_EMA_ISA
