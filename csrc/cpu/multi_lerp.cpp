// The CPU implementation of fused_ema::multi_lerp_: builds a chunk table for the lists it is given
// and runs it with at::parallel_for. The operator serves torch.compile, and the same body serves the
// functional API's fast path (fused_ema._C.lerp_lists_, table.cpp); the per-update hot path of a
// Plan keeps its table in a CpuTable (table.cpp) instead.
#include <map>
#include <string>
#include <utility>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include "table.h"

namespace fused_ema::cpu {

ScalarKind scalar_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ScalarKind::Float;
    case at::kDouble: return ScalarKind::Double;
    case at::kHalf: return ScalarKind::Half;
    case at::kBFloat16: return ScalarKind::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, "fused_ema: averages and models must be float32, float64, float16 or bfloat16, got ",
                       dtype);
  }
}

namespace {

// The widest kernel torch itself uses on this CPU (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY), so both round alike: ATen's AVX2/AVX512 lerp fuses the multiply-add,
// its DEFAULT build does not.
RangeKernel select_kernel(ScalarKind average, ScalarKind model, bool stochastic) {
  using Selector = RangeKernel (*)(ScalarKind, ScalarKind, bool);
  static const Selector selector = []() -> Selector {
    const std::string capability = at::get_cpu_capability();
    const auto built = [](Selector candidate) {
      return candidate(ScalarKind::Float, ScalarKind::Float, false) != nullptr;
    };
    if (capability == "AVX512" && built(&isa_avx512::select_kernel)) {
      return &isa_avx512::select_kernel;
    }
    if ((capability == "AVX2" || capability == "AVX512") && built(&isa_avx2::select_kernel)) {
      return &isa_avx2::select_kernel;
    }
    return &isa_default::select_kernel;
  }();
  return selector(average, model, stochastic);
}

// Below this many blocks (32K elements) a second thread costs more than it saves.
constexpr int64_t kGrainBlocks = 512;

}  // namespace

Table::Table(const TensorRefs& averages, const TensorRefs& models, const std::vector<int64_t>& tensor_indices,
             int64_t sets)
    : sets_(sets) {
  TORCH_CHECK_VALUE(models.empty() || models[0]->device().is_cpu(), "fused_ema: the CPU kernel needs CPU tensors, ",
                    "got models on ", models[0]->device());
  entries_.reserve(models.size());
  averages_.reserve(averages.size());
  const std::string sharing = walk_pairs(
      averages, models, static_cast<int64_t>(tensor_indices.size()), sets,
      [&](int64_t i, const at::Tensor& model, const void* model_data, void* const* average_addresses) {
        averages_.insert(averages_.end(), average_addresses, average_addresses + sets);
        entries_.push_back({model_data, model.numel(), blocks_, static_cast<uint32_t>(tensor_indices[i])});
        blocks_ += blocks_of(model.numel());
        numel_ += model.numel();
      });
  if (!sharing.empty()) {
    TORCH_WARN_ONCE("fused_ema: ", sharing, ", so the CPU kernel updates this table's pairs in turn on one "
                    "thread, as the reference does (is a tensor listed twice, as state_dict() lists a tied weight?)");
    in_order_ = true;
  }
  if (!models.empty()) {
    const ScalarKind average = scalar_kind(averages[0]->scalar_type()), model = scalar_kind(models[0]->scalar_type());
    nearest_ = select_kernel(average, model, false);
    stochastic_ = select_kernel(average, model, true);
  }
}

void Table::run(const std::vector<double>& weights, const std::optional<std::vector<int64_t>>& rounding_keys) const {
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == sets_, "fused_ema: expected ", sets_,
                    " weights, got ", weights.size());
  uint32_t keys[kMaxSets];
  if (rounding_keys) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(rounding_keys->size()) == sets_, "fused_ema: expected ", sets_,
                      " rounding_keys, got ", rounding_keys->size());
    for (int64_t set = 0; set < sets_; ++set) {
      keys[set] = static_cast<uint32_t>((*rounding_keys)[set]);
    }
  }
  if (blocks_ == 0) {
    return;
  }
  const LerpArgs args{entries_.data(), static_cast<int64_t>(entries_.size()), averages_.data(), sets_,
                      weights.data(), rounding_keys ? keys : nullptr};
  const RangeKernel kernel = rounding_keys ? stochastic_ : nearest_;
  if (in_order_) {
    kernel(args, 0, blocks_);  // pair after pair: where pairs share memory, each sees the last one's writes
    return;
  }
  at::parallel_for(0, blocks_, kGrainBlocks, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
}

// Pairs a table cannot hold (strided views, an average laid out differently from its model) are
// updated one at a time through dense temporaries in the average's own memory order, which keeps each
// element's stochastic-rounding index equal to the reference's.
void multi_lerp_lists(const TensorRefs& averages, const TensorRefs& models, c10::ArrayRef<double> weights,
                      c10::ArrayRef<int64_t> tensor_indices, const std::optional<std::vector<int64_t>>& rounding_keys) {
  const auto sets = static_cast<int64_t>(weights.size());
  const auto count = static_cast<int64_t>(models.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(averages.size()) == sets * count, "multi_lerp_: got ", averages.size(),
                    " averages for ", sets, " weights and ", count, " models; pass len(weights) * len(models) ",
                    "averages, set-major");
  TORCH_CHECK_VALUE(static_cast<int64_t>(tensor_indices.size()) == count, "multi_lerp_: got ",
                    tensor_indices.size(), " tensor_indices for ", count, " models");
  TORCH_CHECK_VALUE(!rounding_keys.has_value() || static_cast<int64_t>(rounding_keys->size()) == sets,
                    "multi_lerp_: got ", rounding_keys.has_value() ? rounding_keys->size() : 0,
                    " rounding_keys for ", sets, " weights");
  // Pairs every set can fuse, one table per (average dtype, model dtype).
  struct Pending {
    std::vector<int64_t> pairs;
    TensorRefs models;
    std::vector<int64_t> indices;
  };
  std::map<std::pair<int, int>, Pending> tables;
  std::vector<int64_t> one_at_a_time;
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& model = *models[i];
    bool direct = true;
    for (int64_t set = 0; set < sets; ++set) {
      const at::Tensor& average = *averages[set * count + i];
      TORCH_CHECK(average.device().is_cpu() && model.device().is_cpu(), "multi_lerp_: pair ", i, " is on ",
                  average.device(), " and ", model.device(), "; the CPU kernel needs CPU tensors");
      TORCH_CHECK_VALUE(average.sizes() == model.sizes(), "multi_lerp_: averages[", set * count + i, "] has shape ",
                        average.sizes(), " but models[", i, "] has shape ", model.sizes());
      TORCH_CHECK_TYPE(average.scalar_type() == averages[i]->scalar_type(), "multi_lerp_: averages[",
                       set * count + i, "] is ", average.scalar_type(), " but averages[", i, "] is ",
                       averages[i]->scalar_type(), "; every set must share dtypes");
      direct = direct && pair_problem(average, model).empty();
    }
    scalar_kind(model.scalar_type());  // names an unsupported dtype before anything is written
    scalar_kind(averages[i]->scalar_type());
    if (!direct) {
      one_at_a_time.push_back(i);
      continue;
    }
    Pending& pending =
        tables[{static_cast<int>(averages[i]->scalar_type()), static_cast<int>(model.scalar_type())}];
    pending.pairs.push_back(i);
    pending.models.push_back(&model);
    pending.indices.push_back(tensor_indices[i]);
  }
  for (auto& [dtypes, pending] : tables) {
    for (int64_t first_set = 0; first_set < sets; first_set += kMaxSets) {
      const int64_t batch = std::min(kMaxSets, sets - first_set);
      TensorRefs batch_averages;
      batch_averages.reserve(batch * pending.pairs.size());
      for (int64_t set = first_set; set < first_set + batch; ++set) {
        for (const int64_t i : pending.pairs) {
          batch_averages.push_back(averages[set * count + i]);
        }
      }
      std::optional<std::vector<int64_t>> batch_keys;
      if (rounding_keys) {
        batch_keys.emplace(rounding_keys->begin() + first_set, rounding_keys->begin() + first_set + batch);
      }
      Table(batch_averages, pending.models, pending.indices, batch)
          .run(std::vector<double>(weights.begin() + first_set, weights.begin() + first_set + batch), batch_keys);
    }
  }
  for (const int64_t i : one_at_a_time) {
    for (int64_t set = 0; set < sets; ++set) {
      const at::Tensor& average = *averages[set * count + i];
      const at::Tensor dense_average = average.is_non_overlapping_and_dense() ? average : average.contiguous();
      at::Tensor dense_model = *models[i];
      if (!pair_problem(dense_average, dense_model).empty()) {
        dense_model = at::empty_strided(dense_average.sizes(), dense_average.strides(), models[i]->options());
        dense_model.copy_(*models[i]);
      }
      std::optional<std::vector<int64_t>> key;
      if (rounding_keys) {
        key.emplace(1, (*rounding_keys)[set]);
      }
      Table({&dense_average}, {&dense_model}, {tensor_indices[i]}, 1).run({weights[set]}, key);
      if (!dense_average.is_same(average)) {
        average.copy_(dense_average);
      }
    }
  }
}

namespace {

TensorRefs refs(at::TensorList tensors) {
  TensorRefs result;
  result.reserve(tensors.size());
  for (const at::Tensor& tensor : tensors) {
    result.push_back(&tensor);
  }
  return result;
}

// The schema's implementation.
void multi_lerp_cpu(at::TensorList averages, at::TensorList models, at::ArrayRef<double> weights,
                    at::IntArrayRef tensor_indices, at::OptionalIntArrayRef rounding_keys) {
  std::optional<std::vector<int64_t>> keys;
  if (rounding_keys.has_value()) {
    keys.emplace(rounding_keys->begin(), rounding_keys->end());
  }
  multi_lerp_lists(refs(averages), refs(models), weights, tensor_indices, keys);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ema, CPU, m) {
  m.impl("multi_lerp_", &multi_lerp_cpu);
}

}  // namespace fused_ema::cpu
