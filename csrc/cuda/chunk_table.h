// The chunk table of one group, built on the host (no CUDA, no torch): the layout of
// fused_ema/backends/chunk_table.py, so the list-taking operator and the Python-built persistent
// table feed one kernel. Tested on the host by tests/cuda_host_test.cpp.
//
//   tensors: int64 [N, sets + 3]  model_offset, average_offset[sets], numel, tensor_index
//            (offsets in elements from the first model and the first average of the group)
//   chunks:  int64 [C, 2]         slot (row of tensors), start (offset of the chunk in the tensor)
#pragma once

#include <cstdint>
#include <vector>

namespace fused_ema {
namespace cuda {

// Elements per chunk (one thread block); chunk starts are multiples of it, so a 16-byte aligned
// tensor stays aligned in every chunk. Same value as chunk_table.CHUNK_ELEMENTS.
constexpr int64_t kChunkElements = 2048;

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

}  // namespace cuda
}  // namespace fused_ema
