// Torch glue for the CUDA kernel (multi_lerp_kernel.cu): the CUDA implementation of
// fused_ema::multi_lerp_ (schema in csrc/ops.cpp) and the device-resident table operator the
// "cuda" backend calls on every update. Uses c10/cuda headers only: ATen/cuda/CUDAContext.h would
// pull in cuBLAS and cuSPARSE headers (see FINDINGS.md).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <map>
#include <utility>
#include <vector>

#include "../chunk_table_torch.h"
#include "multi_lerp_kernel.h"

namespace fused_ema {
namespace cuda {
namespace {

ElementType element_type(at::ScalarType type, const char* name) {
  switch (type) {
    case at::kFloat: return ElementType::Float32;
    case at::kDouble: return ElementType::Float64;
    case at::kHalf: return ElementType::Float16;
    case at::kBFloat16: return ElementType::BFloat16;
    default:
      TORCH_CHECK(false, "fused_ema.multi_lerp_ (cuda): ", name, " must be float32, float64, float16 or bfloat16, got ",
                  type, "; convert it, or use backend='foreach'");
  }
}

void check_launch(cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "fused_ema: the CUDA lerp kernel failed to launch: ", cudaGetErrorString(error));
}

int64_t double_bits(double value) {
  int64_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// step_args as the kernel reads them: the float64 bits of each weight, then each rounding key.
void append_step_args(std::vector<int64_t>& out, at::ArrayRef<double> weights, at::OptionalIntArrayRef keys) {
  for (double weight : weights) out.push_back(double_bits(weight));
  for (size_t k = 0; k < weights.size(); ++k) out.push_back(keys.has_value() ? (*keys)[k] : 0);
}

void multi_lerp_cuda(at::TensorList averages, at::TensorList models, at::ArrayRef<double> weights,
                     at::IntArrayRef tensor_indices, at::OptionalIntArrayRef rounding_keys) {
  const int64_t sets = static_cast<int64_t>(weights.size());
  const int64_t count = static_cast<int64_t>(models.size());
  TORCH_CHECK(static_cast<int64_t>(averages.size()) == sets * count, "fused_ema.multi_lerp_: got ", averages.size(),
              " averages for ", count, " models and ", sets, " weights; pass len(weights) * len(models), set-major");
  TORCH_CHECK(static_cast<int64_t>(tensor_indices.size()) == count, "fused_ema.multi_lerp_: got ",
              tensor_indices.size(), " tensor_indices for ", count, " models");
  TORCH_CHECK(!rounding_keys.has_value() || static_cast<int64_t>(rounding_keys->size()) == sets,
              "fused_ema.multi_lerp_: got ", rounding_keys.has_value() ? rounding_keys->size() : 0,
              " rounding_keys for ", sets, " weights");
  TORCH_CHECK(sets >= 1 && sets <= kMaxSets, "fused_ema.multi_lerp_ (cuda): updates 1 to ", kMaxSets,
              " average sets in one pass, got ", sets, "; split the call");
  if (count == 0) return;

  // Pairs grouped by (average dtype, model dtype): one launch each, over one table.
  std::map<std::pair<at::ScalarType, at::ScalarType>, std::vector<int64_t>> groups;
  const at::Device device = models[0].device();
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(models[i].device() == device, "fused_ema.multi_lerp_ (cuda): models[", i, "] is on ",
                models[i].device(), " but models[0] on ", device, "; call once per device");
    element_type(models[i].scalar_type(), "every model tensor");
    element_type(averages[i].scalar_type(), "every average");
    groups[{averages[i].scalar_type(), models[i].scalar_type()}].push_back(i);
  }

  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const auto& [types, members] : groups) {
    std::vector<at::Tensor> group_models, group_averages;
    std::vector<int64_t> group_indices;
    for (int64_t i : members) {
      group_models.push_back(models[i]);
      group_indices.push_back(tensor_indices[i]);
    }
    for (int64_t k = 0; k < sets; ++k) {
      for (int64_t i : members) group_averages.push_back(averages[k * count + i]);
    }
    // The one builder (csrc/chunk_table.cpp) validates every pair: dense, matching strides, one device.
    const ChunkTables tables = build_chunk_tables(group_averages, group_models, group_indices, sets, kChunkElements);
    std::vector<int64_t> table(tables.tensors);  // tensors rows, then chunks rows, then step_args
    const auto tensors_length = static_cast<int64_t>(table.size());
    table.insert(table.end(), tables.chunks.begin(), tables.chunks.end());
    append_step_args(table, weights, rounding_keys);

    // Pinned staging so the copy is asynchronous; the caching host allocator keeps the buffer
    // alive until the copy has run on this stream, and the device copy returns to this stream's
    // pool only after the kernel below (stream order).
    at::Tensor host = at::empty({static_cast<int64_t>(table.size())},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(host.data_ptr<int64_t>(), table.data(), table.size() * sizeof(int64_t));
    const at::Tensor on_device = host.to(device, /*non_blocking=*/true);
    const int64_t* base = on_device.data_ptr<int64_t>();

    MultiLerpArgs args;
    args.model_base = group_models[0].data_ptr();
    args.average_base = group_averages[0].data_ptr();
    args.tensors = base;
    args.chunks = base + tensors_length;
    args.step_args = base + tensors_length + static_cast<int64_t>(tables.chunks.size());
    args.chunk_count = static_cast<int64_t>(tables.chunks.size()) / 2;
    args.chunk_elements = kChunkElements;
    args.sets = static_cast<int>(sets);
    args.average_type = element_type(types.first, "every average");
    args.model_type = element_type(types.second, "every model tensor");
    args.stochastic = rounding_keys.has_value();
    check_launch(launch_multi_lerp(args, stream));
  }
}

// The persistent-table path: the tables were built once (fused_ema/backends/chunk_table.py, with
// the builder of csrc/chunk_table.cpp) and live on the device; an update passes five tensors and
// three integers, no tensor lists. It writes through the table's pointers, which no operator
// schema could declare: a private pybind function (_C._multi_lerp_table_), eager mode only (under
// torch.compile the "cuda" backend calls multi_lerp_ instead).
void multi_lerp_table_cuda(const at::Tensor& model_base, const at::Tensor& average_base, const at::Tensor& tensors,
                           const at::Tensor& chunks, const at::Tensor& step_args, int64_t sets,
                           int64_t chunk_elements, bool stochastic) {
  TORCH_CHECK(tensors.scalar_type() == at::kLong && chunks.scalar_type() == at::kLong &&
                  step_args.scalar_type() == at::kLong && tensors.is_contiguous() && chunks.is_contiguous() &&
                  step_args.is_contiguous(),
              "fused_ema.multi_lerp_table_: the tables must be contiguous int64 tensors");
  TORCH_CHECK(tensors.device() == model_base.device() && chunks.device() == model_base.device() &&
                  step_args.device() == model_base.device() && average_base.device() == model_base.device(),
              "fused_ema.multi_lerp_table_: the tables must be on the device of the tensors they update");
  TORCH_CHECK(sets >= 1 && sets <= kMaxSets && step_args.numel() == 2 * sets &&
                  (tensors.numel() == 0 || tensors.size(-1) == tensor_row_width(sets)),
              "fused_ema.multi_lerp_table_: tables do not match ", sets, " sets");
  c10::cuda::CUDAGuard guard(model_base.device());
  MultiLerpArgs args;
  args.model_base = model_base.data_ptr();
  args.average_base = average_base.data_ptr();
  args.tensors = tensors.data_ptr<int64_t>();
  args.chunks = chunks.data_ptr<int64_t>();
  args.step_args = step_args.data_ptr<int64_t>();
  args.chunk_count = chunks.numel() / 2;
  args.chunk_elements = chunk_elements;
  args.sets = static_cast<int>(sets);
  args.average_type = element_type(average_base.scalar_type(), "average_base");
  args.model_type = element_type(model_base.scalar_type(), "model_base");
  args.stochastic = stochastic;
  check_launch(launch_multi_lerp(args, c10::cuda::getCurrentCUDAStream(model_base.device().index()).stream()));
}

[[maybe_unused]] const bool registered_table_launcher = register_cuda_table_launcher(&multi_lerp_table_cuda);

}  // namespace
}  // namespace cuda
}  // namespace fused_ema

TORCH_LIBRARY_IMPL(fused_ema, CUDA, m) {
  m.impl("multi_lerp_", &fused_ema::cuda::multi_lerp_cuda);
}
