// The chunk-table builder (chunk_table_torch.h) and its Python bindings.
#include <torch/csrc/utils/pybind.h>

#include <algorithm>

#include <ATen/ATen.h>

#include "chunk_table_torch.h"

namespace fused_ema {
namespace {

TableLauncher& cuda_table_launcher() {
  static TableLauncher launcher = nullptr;
  return launcher;
}

TensorRefs refs(const std::vector<at::Tensor>& tensors) {
  TensorRefs result;
  result.reserve(tensors.size());
  for (const at::Tensor& tensor : tensors) {
    result.push_back(&tensor);
  }
  return result;
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

std::string pair_problem(const at::Tensor& average, const at::Tensor& model) {
  if (average.device() != model.device()) {
    return "is on two devices (average on " + average.device().str() + ", model on " + model.device().str() + ")";
  }
  if (average.sizes() != model.sizes()) {
    return "has an average of shape " + c10::str(average.sizes()) + " and a model of shape " +
           c10::str(model.sizes()) + "; a pair must match in shape and strides";
  }
  if (!average.is_non_overlapping_and_dense() || !model.is_non_overlapping_and_dense()) {
    return "is not dense (a strided view)";
  }
  if (average.strides() != model.strides()) {
    return "has an average with strides " + c10::str(average.strides()) + " and a model with strides " +
           c10::str(model.strides()) + "; a pair must match in shape and strides";
  }
  return {};
}

std::string sharing_problem(std::vector<Span> written, const std::vector<Span>& read, int64_t models) {
  // Averages are mostly in address order already (a packed block, clones made in a loop).
  const auto by_begin = [](const Span& a, const Span& b) { return a.begin < b.begin; };
  if (!std::is_sorted(written.begin(), written.end(), by_begin)) {
    std::sort(written.begin(), written.end(), by_begin);
  }
  for (size_t k = 1; k < written.size(); ++k) {
    if (written[k].begin < written[k - 1].end) {
      return c10::str("averages[", written[k - 1].index, "] and averages[", written[k].index, "] share memory");
    }
  }
  if (written.empty()) {
    return {};
  }
  // Disjoint and sorted: the averages a model overlaps end with the last one that begins before the
  // model ends. Most models lie outside the averages' address range and cost one comparison.
  const uintptr_t low = written.front().begin, high = written.back().end;
  for (const Span& model : read) {
    if (model.end <= low || model.begin >= high) {
      continue;
    }
    auto k = std::upper_bound(written.begin(), written.end(), model.end,
                              [](uintptr_t end, const Span& span) { return end <= span.begin; });
    for (; k != written.begin() && (k - 1)->end > model.begin; --k) {
      const Span& average = *(k - 1);
      if (average.index % models != model.index || average.begin != model.begin || average.end != model.end) {
        return c10::str("averages[", average.index, "] shares memory with models[", model.index, "]");
      }
    }
  }
  return {};
}

void check_table_counts(int64_t averages, int64_t models, int64_t tensor_indices, int64_t sets) {
  TORCH_CHECK_VALUE(sets >= 1 && sets <= kMaxSets, "fused_ema: a chunk table holds 1 to ", kMaxSets,
                    " average sets, got ", sets, "; split them over several calls");
  TORCH_CHECK_VALUE(averages == sets * models, "fused_ema: expected ", sets, " x ", models,
                    " averages (set-major), got ", averages);
  TORCH_CHECK_VALUE(tensor_indices == models, "fused_ema: expected ", models, " tensor_indices, got ",
                    tensor_indices);
}

void reject_pair(const TensorRefs& averages, const TensorRefs& models, int64_t set, int64_t i,
                 const std::string& problem) {
  const auto count = static_cast<int64_t>(models.size());
  const at::Tensor& model = *models[i];
  const at::Tensor& average = *averages[set * count + i];
  TORCH_CHECK_TYPE(model.scalar_type() == models[0]->scalar_type(), "fused_ema: models[", i, "] is ",
                   model.scalar_type(), " but models[0] is ", models[0]->scalar_type(),
                   "; one table holds one dtype pair");
  TORCH_CHECK_VALUE(model.device() == models[0]->device(), "fused_ema: models[", i, "] is on ", model.device(),
                    " but models[0] on ", models[0]->device(), "; one table holds one device");
  TORCH_CHECK_TYPE(average.scalar_type() == averages[0]->scalar_type(), "fused_ema: averages[", set * count + i,
                   "] is ", average.scalar_type(), " but averages[0] is ", averages[0]->scalar_type(),
                   "; one table holds one dtype pair (every average in one dtype, every model in one dtype)");
  TORCH_CHECK_VALUE(false, "fused_ema: pair ", i, " of set ", set, " (averages[", set * count + i, "], models[", i,
                    "]) ", problem, "; a chunk table needs dense pairs laid out alike (backend 'foreach' takes any)");
}

ChunkTables build_chunk_tables(const TensorRefs& averages, const TensorRefs& models,
                               const std::vector<int64_t>& tensor_indices, int64_t sets, int64_t chunk_elements) {
  TORCH_CHECK_VALUE(chunk_elements > 0, "fused_ema: chunk_elements must be > 0, got ", chunk_elements);
  ChunkTables tables;
  std::vector<int64_t> numels;
  uintptr_t model_base = 0, average_base = 0;
  int64_t model_element_size = 0, average_element_size = 0;
  std::vector<uintptr_t> addresses(sets);
  const std::string sharing = walk_pairs(
      averages, models, static_cast<int64_t>(tensor_indices.size()), sets,
      [&](int64_t i, const at::Tensor& model, const void* model_data, void* const* average_addresses) {
        if (i == 0) {
          model_base = reinterpret_cast<uintptr_t>(model_data);
          average_base = reinterpret_cast<uintptr_t>(average_addresses[0]);
          model_element_size = model.element_size();
          average_element_size = averages[0]->element_size();
          numels.reserve(models.size());
          tables.tensors.reserve(models.size() * tensor_row_width(sets));
        }
        const auto model_address = reinterpret_cast<uintptr_t>(model_data);
        tables.aligned = tables.aligned && model_address % kVectorBytes == 0;
        for (int64_t set = 0; set < sets; ++set) {
          addresses[set] = reinterpret_cast<uintptr_t>(average_addresses[set]);
          tables.aligned = tables.aligned && addresses[set] % kVectorBytes == 0;
        }
        const bool whole = append_tensor_row(tables.tensors, model_base, model_address, model_element_size,
                                             average_base, addresses, average_element_size, model.numel(),
                                             tensor_indices[i]);
        TORCH_CHECK_VALUE(whole, "fused_ema: models[", i, "] or its averages start at an address that is "
                          "not a multiple of the element size; clone them");
        numels.push_back(model.numel());
      });
  TORCH_CHECK_VALUE(sharing.empty(), "fused_ema: ", sharing, "; the GPU kernels update every pair at once, so "
                    "these would race: pass each average once, or use backend='reference', which updates them in turn");
  tables.chunks = chunk_rows(numels, chunk_elements);
  return tables;
}

ChunkTables build_chunk_tables(const std::vector<at::Tensor>& averages, const std::vector<at::Tensor>& models,
                               const std::vector<int64_t>& tensor_indices, int64_t sets, int64_t chunk_elements) {
  return build_chunk_tables(refs(averages), refs(models), tensor_indices, sets, chunk_elements);
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
