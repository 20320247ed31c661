// The counter-based random bits of stochastic rounding (fused_ema/rounding.py), shared by the CPU
// and CUDA kernels so that every backend rounds a bfloat16 average identically. No torch headers:
// g++ and nvcc both compile it, for host and device.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_EMA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSED_EMA_HOST_DEVICE inline
#endif

namespace fused_ema {

constexpr uint32_t kTensorMultiplier = 0x9E3779B9u;
constexpr uint32_t kElementMultiplier = 0x85EBCA77u;

// MurmurHash3's 32-bit finaliser: a bijection that mixes every input bit.
FUSED_EMA_HOST_DEVICE uint32_t fmix32(uint32_t value) {
  value ^= value >> 16;
  value *= 0x85EBCA6Bu;
  value ^= value >> 13;
  value *= 0xC2B2AE35u;
  value ^= value >> 16;
  return value;
}

// Per (update, set, tensor): computed once per chunk.
FUSED_EMA_HOST_DEVICE uint32_t rounding_stream(uint32_t key, uint32_t tensor_index) {
  return fmix32(key ^ (tensor_index * kTensorMultiplier));
}

// 16 random bits of the element at `element_index` in the tensor's flat memory. Only the low 32
// bits of the index enter, as in rounding.py's uint32 arithmetic.
FUSED_EMA_HOST_DEVICE uint32_t random_bits(uint32_t stream, uint64_t element_index) {
  return fmix32(stream ^ (static_cast<uint32_t>(element_index) * kElementMultiplier)) >> 16;
}

}  // namespace fused_ema
