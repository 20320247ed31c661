// The arithmetic of one element, shared by the CUDA kernel and its host test (tests/cuda_host_test.cpp):
// ATen's lerp with one fma, round-to-nearest-even and stochastic rounding to bfloat16 on float32 bits,
// and the counter-based random bits of fused_ema/rounding.py. No CUDA or torch headers: g++ compiles
// this for the host test, nvcc for the device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FUSED_EMA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSED_EMA_HOST_DEVICE inline
#endif

namespace fused_ema {
namespace cuda {

constexpr uint32_t kTensorMultiplier = 0x9E3779B9u;
constexpr uint32_t kElementMultiplier = 0x85EBCA77u;

// MurmurHash3's 32-bit finaliser.
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

FUSED_EMA_HOST_DEVICE uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

FUSED_EMA_HOST_DEVICE bool is_finite_bits(uint32_t bits) {
  return (bits & 0x7F800000u) != 0x7F800000u;
}

FUSED_EMA_HOST_DEVICE uint32_t nearest_even_increment(uint32_t bits) {
  return 0x7FFFu + ((bits >> 16) & 1u);
}

// bfloat16 bits of a FINITE float32 whose bits are `bits`, rounded by adding `increment` below the
// kept 16 bits: nearest_even_increment(bits) rounds to nearest, random_bits(...) stochastically.
// Non-finite values are the caller's (they round to nearest, which keeps them as they are).
FUSED_EMA_HOST_DEVICE uint16_t round_to_bfloat16_bits(uint32_t bits, uint32_t increment) {
  return static_cast<uint16_t>((bits + increment) >> 16);
}

FUSED_EMA_HOST_DEVICE float fused_multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
FUSED_EMA_HOST_DEVICE double fused_multiply_add(double a, double b, double c) { return fma(a, b, c); }

// ATen's lerp, `weight < 0.5 ? average + weight * diff : model - diff * (1 - weight)`, fused the way
// ATen's CPU kernel does and nvcc contracts ATen's CUDA one: weight 1 gives exactly `model`.
// (1 - weight) is exact for weight in [0.5, 1], so model + (weight - 1) * diff is the same product.
template <typename Compute>
FUSED_EMA_HOST_DEVICE Compute lerp(Compute average, Compute model, Compute weight) {
  const bool small = weight < Compute(0.5);
  const Compute coefficient = small ? weight : weight - Compute(1);
  const Compute base = small ? average : model;
  return fused_multiply_add(coefficient, model - average, base);
}

}  // namespace cuda
}  // namespace fused_ema
