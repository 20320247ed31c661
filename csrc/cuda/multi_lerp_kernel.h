// The launcher of the multi-tensor lerp kernel, on raw pointers: no torch headers, so the .cu that
// defines it compiles in seconds and the torch glue (multi_lerp_cuda.cpp) stays plain C++.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../chunk_table.h"

namespace fused_ema {
namespace cuda {

enum class ElementType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// One group's update: see ../chunk_table.h for the tables. All pointers are device pointers.
struct MultiLerpArgs {
  const void* model_base = nullptr;  // the first model tensor; model offsets count from here
  void* average_base = nullptr;      // the first average tensor
  const int64_t* tensors = nullptr;  // [N, sets + 3]
  const int64_t* chunks = nullptr;   // [chunk_count, 2]
  const int64_t* step_args = nullptr;  // [2 * sets]: float64 bits of each weight, then each rounding key
  int64_t chunk_count = 0;
  int64_t chunk_elements = 0;  // a multiple of 8 * kThreads is fastest; any positive count works
  int sets = 1;
  ElementType average_type = ElementType::Float32;
  ElementType model_type = ElementType::Float32;
  bool stochastic = false;  // bfloat16 averages only; ignored otherwise
};

// kMaxSets, the most average sets one pass updates (the weights sit in registers): chunk_table.h.

// Enqueues one launch on `stream`; returns the launch error (cudaSuccess when none). No sync.
cudaError_t launch_multi_lerp(const MultiLerpArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_ema
