// The torch-facing half of the chunk table (csrc/chunk_table.h holds the layout and the host
// functions): validate a list of (average, model) pairs and build their tables. Used by the CUDA
// list operator (csrc/cuda/multi_lerp_cuda.cpp) and, through pybind, by the Triton and CUDA
// backends' persistent tables (fused_ema/backends/chunk_table.py).
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "chunk_table.h"

namespace pybind11 {
class module_;
}

namespace fused_ema {

struct ChunkTables {
  std::vector<int64_t> tensors;  // [N, sets + 3], row-major
  std::vector<int64_t> chunks;   // [C, 2], row-major
  bool aligned = true;           // every data pointer is a multiple of kVectorBytes
};

// averages is set-major: averages[set * models.size() + i]. Every pair must be dense with
// matching sizes and strides, on the device of models[0], one dtype per side; ValueError naming
// the first pair that is not (the caller says what to use instead).
ChunkTables build_chunk_tables(const std::vector<at::Tensor>& averages, const std::vector<at::Tensor>& models,
                               const std::vector<int64_t>& tensor_indices, int64_t sets, int64_t chunk_elements);

// The CUDA launch of a persistent table, registered by csrc/cuda when the extension is built with
// its CUDA kernels; called through the private pybind function _C._multi_lerp_table_ (eager only:
// it writes through the table's pointers, which no operator schema could declare).
using TableLauncher = void (*)(const at::Tensor& model_base, const at::Tensor& average_base, const at::Tensor& tensors,
                               const at::Tensor& chunks, const at::Tensor& step_args, int64_t sets,
                               int64_t chunk_elements, bool stochastic);
bool register_cuda_table_launcher(TableLauncher launcher);

void bind_chunk_table(pybind11::module_& module);

}  // namespace fused_ema
