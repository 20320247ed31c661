// What one thread block does with one chunk, written for the host and the device alike: the kernel
// (multi_lerp_kernel.cu) runs it per block, and tests/cuda_kernel_emulation.cu runs the same code on
// the host, block after block and thread after thread, against the reference backend. Threads of a
// block share only `ChunkSetup`, written before a barrier, so running them one by one is faithful.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "lerp_math.h"
#include "multi_lerp_kernel.h"

namespace fused_ema {
namespace cuda {

constexpr int kThreads = 256;

// Elements per vector step: 16 bytes of the narrower side, so every access is a 128-bit load or
// store (float32: 4, half types: 8, float64: 2); the wider side takes two or four of them
// (a bfloat16 model into a float32 average: one 16-byte model load, two 16-byte average accesses).
template <typename Average, typename Model>
constexpr int kVectorElements =
    static_cast<int>(kVectorBytes / (sizeof(Average) < sizeof(Model) ? sizeof(Average) : sizeof(Model)));

template <typename T, int N>
struct alignas(kVectorBytes) Pack {
  T values[N];
};

FUSED_EMA_HOST_DEVICE float widen(float value) { return value; }
FUSED_EMA_HOST_DEVICE double widen(double value) { return value; }
FUSED_EMA_HOST_DEVICE float widen(__half value) { return __half2float(value); }
FUSED_EMA_HOST_DEVICE float widen(__nv_bfloat16 value) { return __bfloat162float(value); }

FUSED_EMA_HOST_DEVICE double double_from_bits(int64_t bits) {
  double value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

template <typename Average, typename Model>
using ComputeType = std::conditional_t<std::is_same_v<Average, double> || std::is_same_v<Model, double>, double, float>;

// Rounds the wide result once into the average's type. float64 narrows to the half types through
// float32, as torch's conversions do.
template <typename Average, typename Compute>
FUSED_EMA_HOST_DEVICE Average narrow(Compute result, bool stochastic, uint32_t stream, int64_t index) {
  if constexpr (std::is_same_v<Average, Compute>) {
    return result;
  } else if constexpr (std::is_same_v<Average, float>) {
    return static_cast<float>(result);
  } else if constexpr (std::is_same_v<Average, __half>) {
    return __float2half_rn(static_cast<float>(result));
  } else {
    static_assert(std::is_same_v<Average, __nv_bfloat16>, "unsupported average type");
    const float value = static_cast<float>(result);
    const uint32_t bits = float_bits(value);
    if (!is_finite_bits(bits)) return __float2bfloat16_rn(value);
    const uint32_t increment = stochastic ? random_bits(stream, static_cast<uint64_t>(index))
                                          : nearest_even_increment(bits);
    return __ushort_as_bfloat16(round_to_bfloat16_bits(bits, increment));
  }
}

// Per chunk, shared by the block: each set's weight and rounding stream.
template <typename Average, typename Model>
struct ChunkSetup {
  ComputeType<Average, Model> weights[kMaxSets];
  uint32_t streams[kMaxSets];
};

// Thread `thread` (< args.sets) fills entry `thread` of the setup; the block then waits on a barrier.
template <typename Average, typename Model>
FUSED_EMA_HOST_DEVICE void setup_chunk(const MultiLerpArgs& args, int64_t chunk, int thread,
                                       ChunkSetup<Average, Model>& setup) {
  if (thread >= args.sets) return;
  const int64_t* row = args.tensors + args.chunks[2 * chunk] * (args.sets + 3);
  // ATen's opmath weight: the double rounded once to the compute type.
  setup.weights[thread] = static_cast<ComputeType<Average, Model>>(double_from_bits(args.step_args[thread]));
  setup.streams[thread] = rounding_stream(static_cast<uint32_t>(args.step_args[args.sets + thread]),
                                          static_cast<uint32_t>(row[args.sets + 2]));
}

template <typename Average, typename Model>
FUSED_EMA_HOST_DEVICE void update_chunk(const MultiLerpArgs& args, int64_t chunk, int thread,
                                        const ChunkSetup<Average, Model>& setup) {
  using Compute = ComputeType<Average, Model>;
  const int64_t start = args.chunks[2 * chunk + 1];
  const int64_t* row = args.tensors + args.chunks[2 * chunk] * (args.sets + 3);
  const int64_t numel = row[args.sets + 1];
  const int64_t end = start + args.chunk_elements < numel ? start + args.chunk_elements : numel;
  const Model* model = static_cast<const Model*>(args.model_base) + row[0];
  // Average pointers are recomputed from the table (an L1 hit) rather than kept in shared memory:
  // a pointer read from shared memory would turn global loads and stores into generic ones.
  Average* const average_base = static_cast<Average*>(args.average_base);
  const bool stochastic = args.stochastic && std::is_same_v<Average, __nv_bfloat16>;

  // Vector accesses need every pointer of this tensor 16-byte aligned and the chunk to start on a
  // whole vector step (chunk starts are multiples of chunk_elements, 2048 by default).
  constexpr int kVector = kVectorElements<Average, Model>;
  bool aligned = reinterpret_cast<uintptr_t>(model) % kVectorBytes == 0 && start % kVector == 0;
  for (int k = 0; k < args.sets; ++k) {
    aligned = aligned && reinterpret_cast<uintptr_t>(average_base + row[1 + k]) % kVectorBytes == 0;
  }

  int64_t scalar_start = start;
  if (aligned) {
    const int64_t vector_end = start + (end - start) / kVector * kVector;
    for (int64_t i = start + static_cast<int64_t>(thread) * kVector; i < vector_end; i += kThreads * kVector) {
      const Pack<Model, kVector> model_pack = *reinterpret_cast<const Pack<Model, kVector>*>(model + i);
      Compute model_values[kVector];
#pragma unroll
      for (int j = 0; j < kVector; ++j) model_values[j] = static_cast<Compute>(widen(model_pack.values[j]));
      for (int k = 0; k < args.sets; ++k) {
        auto* pointer = reinterpret_cast<Pack<Average, kVector>*>(average_base + row[1 + k] + i);
        Pack<Average, kVector> pack = *pointer;
#pragma unroll
        for (int j = 0; j < kVector; ++j) {
          const Compute average = static_cast<Compute>(widen(pack.values[j]));
          pack.values[j] = narrow<Average>(lerp(average, model_values[j], setup.weights[k]), stochastic,
                                           setup.streams[k], i + j);
        }
        *pointer = pack;
      }
    }
    scalar_start = vector_end;
  }
  for (int64_t i = scalar_start + thread; i < end; i += kThreads) {
    const Compute model_value = static_cast<Compute>(widen(model[i]));
    for (int k = 0; k < args.sets; ++k) {
      Average* average = average_base + row[1 + k] + i;
      *average = narrow<Average>(lerp(static_cast<Compute>(widen(*average)), model_value, setup.weights[k]),
                                 stochastic, setup.streams[k], i);
    }
  }
}

// Calls `run.template operator()<Average, Model>()` for the element types named in `args`.
template <typename Run>
inline cudaError_t dispatch_types(const MultiLerpArgs& args, Run&& run) {
  auto for_model = [&](auto average_tag) -> cudaError_t {
    using Average = decltype(average_tag);
    switch (args.model_type) {
      case ElementType::Float32: return run.template operator()<Average, float>();
      case ElementType::Float64: return run.template operator()<Average, double>();
      case ElementType::Float16: return run.template operator()<Average, __half>();
      case ElementType::BFloat16: return run.template operator()<Average, __nv_bfloat16>();
    }
    return cudaErrorInvalidValue;
  };
  switch (args.average_type) {
    case ElementType::Float32: return for_model(float{});
    case ElementType::Float64: return for_model(double{});
    case ElementType::Float16: return for_model(__half{});
    case ElementType::BFloat16: return for_model(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

inline bool valid(const MultiLerpArgs& args) {
  return args.sets >= 1 && args.sets <= kMaxSets && args.chunk_elements > 0 &&
         args.chunk_count >= 0 && args.chunk_count <= 0x7FFFFFFF;
}

}  // namespace cuda
}  // namespace fused_ema
