// The chunk table: the one description of "which elements of which tensors" every fused kernel
// walks, built here once for all of them (the CUDA kernel, the Triton launcher through
// fused_ema/backends/chunk_table.py, and its constants for the CPU kernel). No torch and no CUDA
// headers: g++ compiles this for the host test (tests/cuda_host_test.cpp), nvcc for the kernels.
//
//   tensors: int64 [N, sets + 3]  model_offset, average_offset[sets], numel, tensor_index
//            (offsets in elements from the first model and the first average of the group)
//   chunks:  int64 [C, 2]         slot (row of tensors), start (offset of the chunk in the tensor)
//
// The torch-facing builder (validation, tensors out) is chunk_table.cpp.
#pragma once

#include <cstdint>
#include <vector>

namespace fused_ema {

// The most average sets one pass updates: every kernel keeps the weights in a fixed-size array.
// Exported to Python as fused_ema._C.MAX_SETS.
constexpr int64_t kMaxSets = 16;

// Elements per chunk (one CUDA thread block, one Triton program); chunk starts are multiples of
// it, so a 16-byte aligned tensor stays aligned in every chunk. Exported as _C.CHUNK_ELEMENTS.
constexpr int64_t kChunkElements = 2048;

// Byte alignment of every pointer that lets a kernel use 16-byte vector accesses throughout.
constexpr int64_t kVectorBytes = 16;

inline int64_t tensor_row_width(int64_t sets) { return sets + 3; }

// Rows (slot, start) covering every element of every tensor exactly once, tensors in order.
inline std::vector<int64_t> chunk_rows(const std::vector<int64_t>& numels, int64_t chunk_elements) {
  std::vector<int64_t> rows;
  for (int64_t slot = 0; slot < static_cast<int64_t>(numels.size()); ++slot) {
    for (int64_t start = 0; start < numels[slot]; start += chunk_elements) {
      rows.push_back(slot);
      rows.push_back(start);
    }
  }
  return rows;
}

// One row of the tensors table from byte addresses; false when an address is not a whole number
// of elements from its base (a tensor at an odd address: the caller reports it).
inline bool append_tensor_row(std::vector<int64_t>& rows, uintptr_t model_base, uintptr_t model,
                              int64_t model_element_size, uintptr_t average_base,
                              const std::vector<uintptr_t>& averages, int64_t average_element_size,
                              int64_t numel, int64_t tensor_index) {
  const int64_t model_bytes = static_cast<int64_t>(model - model_base);
  if (model_bytes % model_element_size != 0) return false;
  rows.push_back(model_bytes / model_element_size);
  for (uintptr_t average : averages) {
    const int64_t average_bytes = static_cast<int64_t>(average - average_base);
    if (average_bytes % average_element_size != 0) return false;
    rows.push_back(average_bytes / average_element_size);
  }
  rows.push_back(numel);
  rows.push_back(tensor_index);
  return true;
}

}  // namespace fused_ema
