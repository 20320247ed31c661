// CpuTable: the chunk table of one plan group, kept across updates so that an update costs one
// Python call with the weights, not a pass over thousands of tensor handles.
//
// It holds the at::Tensor handles, so `param.data = t` (which swaps the storage inside the same
// TensorImpl) is visible here. Each update re-reads every tensor's dtype, sizes, strides and data
// pointer (a few ns per tensor): moved pointers rebuild the table silently; any other change
// marks the table stale and it refuses to run until the owner builds a new one.
#include <atomic>
#include <utility>

#include <ATen/Parallel.h>

#include <torch/csrc/utils/pybind.h>

#include "table.h"

namespace fused_ema::cpu {
namespace {

// TensorImpl::data() without its out-of-line checks (the table was built from these tensors, so
// they have storage and a dtype); only ever compared, never dereferenced.
const void* data_address(const c10::TensorImpl* impl) {
  const auto base = reinterpret_cast<uintptr_t>(impl->unsafe_storage().data());
  return reinterpret_cast<const void*>(base + impl->storage_offset() * impl->itemsize());
}

class CpuTable {
 public:
  CpuTable(std::vector<at::Tensor> averages, std::vector<at::Tensor> models, std::vector<int64_t> tensor_indices,
           int64_t sets)
      : averages_(std::move(averages)),
        models_(std::move(models)),
        tensor_indices_(std::move(tensor_indices)),
        sets_(sets),
        table_(averages_, models_, tensor_indices_, sets_) {
    tensors_.reserve(models_.size() + averages_.size());
    for (const auto* list : {&models_, &averages_}) {
      for (const at::Tensor& tensor : *list) {
        const c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
        tensors_.push_back({impl, impl->dtype(), data_address(impl), static_cast<int64_t>(layouts_.size()), impl->dim()});
        layouts_.insert(layouts_.end(), impl->sizes().begin(), impl->sizes().end());
        layouts_.insert(layouts_.end(), impl->strides().begin(), impl->strides().end());
      }
    }
  }

  // True when a tensor changed dtype, device, shape or strides: the table can no longer run.
  // Otherwise re-reads the data pointers (rebuilding the table if one moved) and returns false,
  // and the next lerp_ trusts this check instead of repeating it.
  bool refresh() {
    if (stale_) {
      return true;
    }
    const auto count = static_cast<int64_t>(tensors_.size());
    std::atomic<bool> stale{false}, moved{false};
    // Thousands of TensorImpls scattered over the heap: worth a second thread past a few thousand.
    at::parallel_for(0, count, kCheckGrain, [&](int64_t begin, int64_t end) {
      bool range_stale = false, range_moved = false;
      for (int64_t i = begin; i < end && !range_stale; ++i) {
        // Two stages ahead: the TensorImpl first, then (once it has arrived) the StorageImpl it
        // points to; both are cache misses otherwise, and they dominate this loop.
        if (i + 2 * kPrefetchAhead < end) {
          const char* ahead = reinterpret_cast<const char*>(tensors_[i + 2 * kPrefetchAhead].impl);
          for (size_t line = 0; line < sizeof(c10::TensorImpl); line += 64) {
            FUSED_EMA_PREFETCH(ahead + line);
          }
        }
        if (i + kPrefetchAhead < end) {
          FUSED_EMA_PREFETCH(tensors_[i + kPrefetchAhead].impl->unsafe_storage().unsafeGetStorageImpl());
        }
        Snapshot& snapshot = tensors_[i];
        const c10::TensorImpl* impl = snapshot.impl;
        bool same = impl->dtype() == snapshot.dtype && impl->device_type() == c10::DeviceType::CPU &&
                    impl->layout() == c10::kStrided && impl->dim() == snapshot.dim;
        if (same) {
          const auto sizes = impl->sizes();
          const auto strides = impl->strides();
          const int64_t* layout = layouts_.data() + snapshot.layout;
          // A hand-written loop: std::equal becomes a memcmp call, which dominated this check.
          for (int64_t d = 0; same && d < snapshot.dim; ++d) {
            same = sizes[d] == layout[d] && strides[d] == layout[snapshot.dim + d];
          }
        }
        range_stale = !same;
        if (same) {
          const void* data = data_address(impl);
          range_moved = range_moved || data != snapshot.data;
          snapshot.data = data;
        }
      }
      if (range_stale) {
        stale.store(true, std::memory_order_relaxed);
      }
      if (range_moved) {
        moved.store(true, std::memory_order_relaxed);
      }
    });
    if (stale.load()) {
      stale_ = true;
      return true;
    }
    if (moved.load()) {
      table_ = Table(averages_, models_, tensor_indices_, sets_);
    }
    checked_ = true;
    return false;
  }

  void lerp_(const std::vector<double>& weights, const std::optional<std::vector<int64_t>>& rounding_keys) {
    if (!checked_ && refresh()) {
      TORCH_CHECK(false, "fused_ema: a tensor of this CpuTable changed dtype, device, shape or strides since it "
                         "was built; build a new table (Plan.lerp_ does this by regrouping)");
    }
    checked_ = false;
    pybind11::gil_scoped_release no_gil;
    table_.run(weights, rounding_keys);
  }

  int64_t numel() const { return table_.numel(); }
  int64_t sets() const { return sets_; }
  int64_t size() const { return static_cast<int64_t>(models_.size()); }

 private:
  static constexpr int64_t kPrefetchAhead = 8;
  static constexpr int64_t kCheckGrain = 2048;

  struct Snapshot {
    const c10::TensorImpl* impl;  // kept alive by averages_ / models_
    caffe2::TypeMeta dtype;
    const void* data;
    int64_t layout;  // offset of its sizes, then strides, in layouts_
    int64_t dim;
  };

  std::vector<at::Tensor> averages_, models_;
  std::vector<int64_t> tensor_indices_;
  int64_t sets_;
  Table table_;
  std::vector<Snapshot> tensors_;
  std::vector<int64_t> layouts_;
  bool stale_ = false;
  bool checked_ = false;
};

}  // namespace

void bind_cpu_table(pybind11::module_& module) {
  namespace py = pybind11;
  py::class_<CpuTable>(module, "CpuTable", R"(The chunk table of one group of (average, model) pairs, kept across updates.

CpuTable(averages, models, tensor_indices, sets): averages is set-major (sets x len(models)), every
pair dense with matching strides, one dtype pair, on the CPU. lerp_(weights, rounding_keys=None)
updates averages[k][i] <- lerp(averages[k][i], models[i], weights[k]) in one parallel pass.
refresh() returns True when a tensor changed dtype, shape or strides (the table is then stale and
must be rebuilt) and follows moved storages silently otherwise.)")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>, int64_t>(),
           py::arg("averages"), py::arg("models"), py::arg("tensor_indices"), py::arg("sets"))
      .def("refresh", &CpuTable::refresh)
      .def("lerp_", &CpuTable::lerp_, py::arg("weights"), py::arg("rounding_keys") = py::none())
      .def_property_readonly("numel", &CpuTable::numel)
      .def_property_readonly("sets", &CpuTable::sets)
      .def("__len__", &CpuTable::size);
}

}  // namespace fused_ema::cpu
