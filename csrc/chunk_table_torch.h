// The torch-facing half of the chunk table (csrc/chunk_table.h holds the layout and the host
// functions): the one walk that validates a list of (average, model) pairs and visits them, and the
// two tables built from it. The offset table (build_chunk_tables) serves the CUDA list operator
// (csrc/cuda/multi_lerp_cuda.cpp) and, through pybind, the Triton and CUDA backends' persistent
// tables (fused_ema/backends/chunk_table.py); the CPU kernel's pointer table (csrc/cpu/table.h,
// 64-element blocks for at::vec) is built from the same walk.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "chunk_table.h"

namespace pybind11 {
class module_;
}

namespace fused_ema {

// Tensors by address: the callers own them (an operator's arguments, Python objects), and copying
// an at::Tensor costs an atomic reference count per tensor.
using TensorRefs = std::vector<const at::Tensor*>;

// Why (average, model) cannot be a pair of a chunk table, as the end of a sentence ("is not dense (a
// strided view)"); empty when it can: one device, one shape, both dense, the same strides.
std::string pair_problem(const at::Tensor& average, const at::Tensor& model);

// The counts every table checks first: 1 to kMaxSets sets, sets x len(models) averages, one tensor
// index per model (ValueError naming the count otherwise).
void check_table_counts(int64_t averages, int64_t models, int64_t tensor_indices, int64_t sets);

// Throws the error for pair i of set `set`: TypeError for a dtype other than the first pair's,
// ValueError for a device, shape or layout problem. Out of line: the walk below stays small.
[[noreturn]] void reject_pair(const TensorRefs& averages, const TensorRefs& models, int64_t set, int64_t i,
                              const std::string& problem);

// The bytes [begin, end) of a dense tensor, and its position in the caller's list.
struct Span {
  uintptr_t begin, end;
  int64_t index;
};

// Where an average shares memory with another average, or with the model of another pair (or with
// part of its own), as a phrase ("averages[0] and averages[3] share memory"); empty when none does.
// A table's pairs are updated in parallel, so such pairs would race (a tied weight listed twice, as
// state_dict() lists it, is the usual cause): the CPU table then runs them in order on one thread,
// as the reference does, and the GPU tables refuse them. Models may share memory with each other:
// they are only read. written: the averages' spans (index set-major), read: the models'.
std::string sharing_problem(std::vector<Span> written, const std::vector<Span>& read, int64_t models);

// The one walk over the pairs of a chunk table: checks the counts, then each pair in order (the
// models on one device in one dtype, the averages in one dtype, every pair as pair_problem wants),
// and calls visit(i, model, model_address, average_addresses) for pair i, average_addresses[k] being
// the data of averages[k * len(models) + i]. Returns the pairs' sharing_problem, for the caller to
// decide. Nothing is visited after a bad pair; the caller writes nothing until the walk returns.
// averages is set-major.
template <typename Visit>
[[nodiscard]] std::string walk_pairs(const TensorRefs& averages, const TensorRefs& models, int64_t tensor_indices,
                                     int64_t sets, Visit&& visit) {
  const auto count = static_cast<int64_t>(models.size());
  check_table_counts(static_cast<int64_t>(averages.size()), count, tensor_indices, sets);
  if (count == 0) return {};
  const at::Tensor& first_model = *models[0];
  const at::Tensor& first_average = *averages[0];
  const auto model_bytes = static_cast<uintptr_t>(first_model.element_size());
  const auto average_bytes = static_cast<uintptr_t>(first_average.element_size());
  std::vector<Span> written, read;  // the averages' and the models' memory, for sharing_problem
  written.reserve(averages.size());
  read.reserve(models.size());
  std::array<void*, kMaxSets> average_addresses{};
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& model = *models[i];
    if (model.scalar_type() != first_model.scalar_type() || model.device() != first_model.device()) {
      reject_pair(averages, models, 0, i, {});
    }
    const void* model_address = model.const_data_ptr();
    const auto numel = static_cast<uintptr_t>(model.numel());
    if (numel > 0) {
      const auto begin = reinterpret_cast<uintptr_t>(model_address);
      read.push_back({begin, begin + numel * model_bytes, i});
    }
    for (int64_t set = 0; set < sets; ++set) {
      const at::Tensor& average = *averages[set * count + i];
      std::string problem = pair_problem(average, model);
      if (!problem.empty() || average.scalar_type() != first_average.scalar_type()) {
        reject_pair(averages, models, set, i, problem);
      }
      average_addresses[set] = average.data_ptr();
      if (numel > 0) {
        const auto begin = reinterpret_cast<uintptr_t>(average_addresses[set]);
        written.push_back({begin, begin + numel * average_bytes, set * count + i});
      }
    }
    visit(i, model, model_address, average_addresses.data());
  }
  return sharing_problem(std::move(written), read, count);
}

struct ChunkTables {
  std::vector<int64_t> tensors;  // [N, sets + 3], row-major
  std::vector<int64_t> chunks;   // [C, 2], row-major
  bool aligned = true;           // every data pointer is a multiple of kVectorBytes
};

// The offset table of the pairs walk_pairs accepts (it names the first pair it does not), also
// rejecting a pair at an address that is not a whole number of elements from its base.
// averages is set-major: averages[set * models.size() + i].
ChunkTables build_chunk_tables(const TensorRefs& averages, const TensorRefs& models,
                               const std::vector<int64_t>& tensor_indices, int64_t sets, int64_t chunk_elements);
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
