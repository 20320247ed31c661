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

#include "chunk_table.h"
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
    const at::Tensor& model = models[i];
    const at::Tensor& first = averages[i];
    TORCH_CHECK(model.device() == device, "fused_ema.multi_lerp_ (cuda): models[", i, "] is on ", model.device(),
                " but models[0] on ", device, "; call once per device");
    TORCH_CHECK(model.is_non_overlapping_and_dense(), "fused_ema.multi_lerp_ (cuda): models[", i,
                "] is not dense (a strided view); pass contiguous tensors or use backend='foreach'");
    for (int64_t k = 0; k < sets; ++k) {
      const at::Tensor& average = averages[k * count + i];
      TORCH_CHECK(average.device() == device && average.sizes() == model.sizes() &&
                      average.strides() == model.strides() && average.scalar_type() == first.scalar_type(),
                  "fused_ema.multi_lerp_ (cuda): averages[", k * count + i, "] must match models[", i,
                  "] in device, shape and strides (and averages[", i, "] in dtype); use backend='foreach'");
    }
    element_type(model.scalar_type(), "every model tensor");
    element_type(first.scalar_type(), "every average");
    groups[{first.scalar_type(), model.scalar_type()}].push_back(i);
  }

  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const auto& [types, members] : groups) {
    const at::Tensor& model_base = models[members[0]];
    const at::Tensor& average_base = averages[members[0]];
    std::vector<int64_t> table;  // tensors rows, then chunks rows, then step_args
    std::vector<int64_t> numels;
    for (int64_t i : members) {
      std::vector<uintptr_t> average_addresses;
      for (int64_t k = 0; k < sets; ++k) {
        average_addresses.push_back(reinterpret_cast<uintptr_t>(averages[k * count + i].data_ptr()));
      }
      const bool whole = append_tensor_row(
          table, reinterpret_cast<uintptr_t>(model_base.data_ptr()), reinterpret_cast<uintptr_t>(models[i].data_ptr()),
          models[i].element_size(), reinterpret_cast<uintptr_t>(average_base.data_ptr()), average_addresses,
          average_base.element_size(), models[i].numel(), tensor_indices[i]);
      TORCH_CHECK(whole, "fused_ema.multi_lerp_ (cuda): models[", i, "] or its averages start at an address that is "
                  "not a multiple of the element size; clone them or use backend='foreach'");
      numels.push_back(models[i].numel());
    }
    const int64_t tensors_length = static_cast<int64_t>(table.size());
    const std::vector<int64_t> chunks = chunk_rows(numels, kChunkElements);
    table.insert(table.end(), chunks.begin(), chunks.end());
    append_step_args(table, weights, rounding_keys);

    // Pinned staging so the copy is asynchronous; the caching host allocator keeps the buffer
    // alive until the copy has run on this stream.
    at::Tensor host = at::empty({static_cast<int64_t>(table.size())},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(host.data_ptr<int64_t>(), table.data(), table.size() * sizeof(int64_t));
    const at::Tensor on_device = host.to(device, /*non_blocking=*/true);
    const int64_t* base = on_device.data_ptr<int64_t>();

    MultiLerpArgs args;
    args.model_base = model_base.data_ptr();
    args.average_base = average_base.data_ptr();
    args.tensors = base;
    args.chunks = base + tensors_length;
    args.step_args = base + tensors_length + static_cast<int64_t>(chunks.size());
    args.chunk_count = static_cast<int64_t>(chunks.size()) / 2;
    args.chunk_elements = kChunkElements;
    args.sets = static_cast<int>(sets);
    args.average_type = element_type(types.first, "every average");
    args.model_type = element_type(types.second, "every model tensor");
    args.stochastic = rounding_keys.has_value();
    check_launch(launch_multi_lerp(args, stream));
  }
}

// The persistent-table path: the tables were built once by fused_ema/backends/chunk_table.py and
// live on the device; an update passes five tensors and three integers, no tensor lists. It writes
// through the table's pointers, which the dispatcher cannot see: eager mode only (under
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

}  // namespace
}  // namespace cuda
}  // namespace fused_ema

// The table operator exists only in CUDA builds, so its schema is declared beside its one kernel.
TORCH_LIBRARY_FRAGMENT(fused_ema, m) {
  m.def("multi_lerp_table_(Tensor model_base, Tensor(a!) average_base, Tensor tensors, Tensor chunks, "
        "Tensor step_args, int sets, int chunk_elements, bool stochastic) -> ()");
}

TORCH_LIBRARY_IMPL(fused_ema, CUDA, m) {
  m.impl("multi_lerp_", &fused_ema::cuda::multi_lerp_cuda);
  m.impl("multi_lerp_table_", &fused_ema::cuda::multi_lerp_table_cuda);
}
