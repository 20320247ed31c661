// The CPU kernel's view of the chunk table of one group of (average, model) pairs: pointer entries
// over 64-element blocks (at::vec's layout), where the GPU kernels take element offsets over 2048-element
// chunks. Built by the one walk of csrc/chunk_table_torch.h (walk_pairs), which validates the pairs
// for both views. Built by the list op and the functional fast path (multi_lerp.cpp) on every call,
// and kept across updates by CpuTable (table.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "../chunk_table_torch.h"
#include "lerp_kernel.h"

namespace pybind11 {
class module_;
}

namespace fused_ema::cpu {

// TensorRefs and pair_problem come from the enclosing fused_ema namespace (chunk_table_torch.h).

ScalarKind scalar_kind(at::ScalarType dtype);

// Pointers of dense pairs with matching strides, one dtype pair, all on the CPU.
// averages is set-major: averages[set * models.size() + i].
class Table {
 public:
  Table() = default;
  Table(const TensorRefs& averages, const TensorRefs& models, const std::vector<int64_t>& tensor_indices,
        int64_t sets);

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
  bool in_order_ = false;             // some pairs share memory (sharing_problem): run on one thread
};

// averages[k * len(models) + i] <- lerp(that average, models[i], weights[k]) for any CPU pairs of
// kernel dtypes: one Table per dtype pair, strided pairs through dense temporaries. Checks every pair
// before it writes anything. The body of the fused_ema::multi_lerp_ operator.
void multi_lerp_lists(const TensorRefs& averages, const TensorRefs& models, c10::ArrayRef<double> weights,
                      c10::ArrayRef<int64_t> tensor_indices, const std::optional<std::vector<int64_t>>& rounding_keys);

void bind_cpu_table(pybind11::module_& module);

}  // namespace fused_ema::cpu
