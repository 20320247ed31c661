// The chunk-table builder (chunk_table_torch.h) and its Python bindings.
#include <torch/csrc/utils/pybind.h>

#include <ATen/ATen.h>

#include "chunk_table_torch.h"

namespace fused_ema {
namespace {

TableLauncher& cuda_table_launcher() {
  static TableLauncher launcher = nullptr;
  return launcher;
}

at::Tensor to_tensor(const std::vector<int64_t>& values, int64_t columns) {
  at::Tensor tensor = at::empty({static_cast<int64_t>(values.size()) / columns, columns}, at::kLong);
  std::copy(values.begin(), values.end(), tensor.data_ptr<int64_t>());
  return tensor;
}

}  // namespace

bool register_cuda_table_launcher(TableLauncher launcher) {
  cuda_table_launcher() = launcher;
  return true;
}

ChunkTables build_chunk_tables(const std::vector<at::Tensor>& averages, const std::vector<at::Tensor>& models,
                               const std::vector<int64_t>& tensor_indices, int64_t sets, int64_t chunk_elements) {
  const auto count = static_cast<int64_t>(models.size());
  TORCH_CHECK_VALUE(sets >= 1 && sets <= kMaxSets, "fused_ema: a chunk table holds 1 to ", kMaxSets,
                    " average sets, got ", sets, "; split them over several calls");
  TORCH_CHECK_VALUE(static_cast<int64_t>(averages.size()) == sets * count, "fused_ema: expected ", sets, " x ", count,
                    " averages (set-major), got ", averages.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(tensor_indices.size()) == count, "fused_ema: expected ", count,
                    " tensor_indices, got ", tensor_indices.size());
  TORCH_CHECK_VALUE(chunk_elements > 0, "fused_ema: chunk_elements must be > 0, got ", chunk_elements);
  ChunkTables tables;
  if (count == 0) return tables;
  const at::Tensor& model_base = models[0];
  const at::Tensor& average_base = averages[0];
  const auto model_base_address = reinterpret_cast<uintptr_t>(model_base.data_ptr());
  const auto average_base_address = reinterpret_cast<uintptr_t>(average_base.data_ptr());
  std::vector<int64_t> numels;
  numels.reserve(count);
  tables.tensors.reserve(count * tensor_row_width(sets));
  std::vector<uintptr_t> average_addresses(sets);
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& model = models[i];
    TORCH_CHECK_VALUE(model.device() == model_base.device() && model.scalar_type() == model_base.scalar_type(),
                      "fused_ema: models[", i, "] is ", model.scalar_type(), " on ", model.device(), " but models[0] ",
                      model_base.scalar_type(), " on ", model_base.device(), "; one table holds one device and dtype pair");
    TORCH_CHECK_VALUE(model.is_non_overlapping_and_dense(), "fused_ema: models[", i,
                      "] is not dense (a strided view); a chunk table needs dense tensors");
    for (int64_t set = 0; set < sets; ++set) {
      const at::Tensor& average = averages[set * count + i];
      TORCH_CHECK_VALUE(average.device() == model.device() && average.scalar_type() == average_base.scalar_type() &&
                            average.sizes() == model.sizes() && average.strides() == model.strides(),
                        "fused_ema: averages[", set * count + i, "] must match models[", i,
                        "] in device, shape and strides, and averages[0] in dtype");
      average_addresses[set] = reinterpret_cast<uintptr_t>(average.data_ptr());
      tables.aligned = tables.aligned && average_addresses[set] % kVectorBytes == 0;
    }
    const auto model_address = reinterpret_cast<uintptr_t>(model.data_ptr());
    tables.aligned = tables.aligned && model_address % kVectorBytes == 0;
    const bool whole = append_tensor_row(tables.tensors, model_base_address, model_address, model.element_size(),
                                         average_base_address, average_addresses, average_base.element_size(),
                                         model.numel(), tensor_indices[i]);
    TORCH_CHECK_VALUE(whole, "fused_ema: models[", i, "] or its averages start at an address that is not a "
                      "multiple of the element size; clone them");
    numels.push_back(model.numel());
  }
  tables.chunks = chunk_rows(numels, chunk_elements);
  return tables;
}

void bind_chunk_table(pybind11::module_& module) {
  namespace py = pybind11;
  module.attr("MAX_SETS") = kMaxSets;
  module.attr("CHUNK_ELEMENTS") = kChunkElements;
  module.attr("VECTOR_BYTES") = kVectorBytes;
  module.def(
      "build_chunk_table",
      [](const std::vector<at::Tensor>& averages, const std::vector<at::Tensor>& models,
         const std::vector<int64_t>& tensor_indices, int64_t sets, int64_t chunk_elements) {
        const ChunkTables tables = build_chunk_tables(averages, models, tensor_indices, sets, chunk_elements);
        return py::make_tuple(to_tensor(tables.tensors, tensor_row_width(sets)), to_tensor(tables.chunks, 2),
                              tables.aligned);
      },
      py::arg("averages"), py::arg("models"), py::arg("tensor_indices"), py::arg("sets"),
      py::arg("chunk_elements") = kChunkElements,
      R"(The chunk table of (average, model) pairs, on the host: (tensors, chunks, aligned).

averages is set-major (sets x len(models)). tensors is int64 [N, sets + 3]: model_offset,
average_offset[sets] (elements from models[0] and averages[0]), numel, tensor_index; chunks is
int64 [C, 2]: slot, start; aligned says every data pointer is a multiple of VECTOR_BYTES.)");
  module.def(
      "_multi_lerp_table_",
      [](const at::Tensor& model_base, const at::Tensor& average_base, const at::Tensor& tensors,
         const at::Tensor& chunks, const at::Tensor& step_args, int64_t sets, int64_t chunk_elements,
         bool stochastic) {
        TORCH_CHECK(cuda_table_launcher() != nullptr, "fused_ema: this extension was built without its CUDA "
                    "kernels; rebuild it with a CUDA build of torch and nvcc, or use backend='triton' or 'foreach'");
        cuda_table_launcher()(model_base, average_base, tensors, chunks, step_args, sets, chunk_elements, stochastic);
      },
      "Private: one CUDA launch over a persistent device chunk table (fused_ema/backends/cuda.py).");
}

}  // namespace fused_ema
