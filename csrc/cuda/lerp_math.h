// The arithmetic of one element, shared by the CUDA kernel and its host test (tests/cuda_host_test.cpp):
// ATen's lerp with one fma, round-to-nearest-even and stochastic rounding to bfloat16 on float32 bits,
// with the counter-based random bits of csrc/rounding.h. No CUDA or torch headers: g++ compiles
// this for the host test, nvcc for the device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../rounding.h"

namespace fused_ema {
namespace cuda {

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
