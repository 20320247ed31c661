// The chunk table of one group of (average, model) pairs, and the persistent CpuTable that keeps
// it across updates. Shared by the list op (multi_lerp.cpp) and the Python hot path (table.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "../chunk_table.h"
#include "lerp_kernel.h"

namespace pybind11 {
class module_;
}

namespace fused_ema::cpu {

// kMaxSets (sets one kernel call updates) comes from the shared chunk-table header.

ScalarKind scalar_kind(at::ScalarType dtype);

// Pointers of dense pairs with matching strides, one dtype pair, all on the CPU.
// averages is set-major: averages[set * models.size() + i].
class Table {
 public:
  Table() = default;
  Table(const std::vector<at::Tensor>& averages, const std::vector<at::Tensor>& models,
        const std::vector<int64_t>& tensor_indices, int64_t sets);

  // averages[k][i] <- lerp(averages[k][i], models[i], weights[k]) over the whole table.
  void run(const std::vector<double>& weights, const std::optional<std::vector<int64_t>>& rounding_keys) const;

  int64_t numel() const { return numel_; }

 private:
  std::vector<TableEntry> entries_;
  std::vector<void*> averages_;  // entry-major: averages_[entry * sets_ + set]
  int64_t sets_ = 0;
  int64_t blocks_ = 0;
  int64_t numel_ = 0;
  RangeKernel nearest_ = nullptr;
  RangeKernel stochastic_ = nullptr;  // the same as nearest_ unless the averages are bfloat16
};

// Why a pair cannot go in a Table (empty string when it can).
std::string pair_problem(const at::Tensor& average, const at::Tensor& model);

void bind_cpu_table(pybind11::module_& module);

}  // namespace fused_ema::cpu
