// TensorWatch (tensor_watch.h). Holding the at::Tensor handles is what makes `param.data = t` (which
// swaps the storage inside the same TensorImpl) visible here, and `storage.resize_()` too (it
// replaces the data inside the same StorageImpl): both show up as a new data address.
#include <atomic>
#include <utility>

#include <ATen/Parallel.h>

#include <torch/csrc/utils/pybind.h>

#include "tensor_watch.h"

#if defined(__GNUC__) || defined(__clang__)
#define FUSED_EMA_WATCH_PREFETCH(address) __builtin_prefetch(address)
#else
#define FUSED_EMA_WATCH_PREFETCH(address) ((void)(address))
#endif

namespace fused_ema {
namespace {

// Each tensor costs a few cache lines (its TensorImpl, then its StorageImpl), about 5 ns a tensor on
// one core here. A second thread already pays off at 1000 tensors (4.4 us instead of 5.2; 8000
// tensors: 27 us instead of 42; benchmarks/many_small_tensors.py, 2 cores).
constexpr int64_t kParallelMinTensors = 1024;
constexpr int64_t kCheckGrain = 512;
// Two stages ahead: the TensorImpl first, then (once it has arrived) the StorageImpl it points to.
constexpr int64_t kPrefetchAhead = 8;

const char* state_name(WatchState state) {
  switch (state) {
    case WatchState::kUnchanged: return "unchanged";
    case WatchState::kMoved: return "moved";
    case WatchState::kStale: return "stale";
  }
  return "stale";
}

}  // namespace

TensorWatch::TensorWatch(std::vector<at::Tensor> tensors) : tensors_(std::move(tensors)) {
  snapshots_.reserve(tensors_.size());
  for (size_t index = 0; index < tensors_.size(); ++index) {
    const at::Tensor& tensor = tensors_[index];
    TORCH_CHECK_VALUE(tensor.defined(), "fused_ema: TensorWatch got an undefined tensor at position ", index,
                      "; pass defined tensors only");
    const c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
    const c10::StorageImpl* storage = impl->has_storage() ? impl->unsafe_storage().unsafeGetStorageImpl() : nullptr;
    TORCH_CHECK_VALUE(storage != nullptr && tensor.layout() == c10::kStrided, "fused_ema: TensorWatch got a ",
                      tensor.layout(), " tensor without storage at position ", index,
                      "; only strided tensors with storage have addresses to watch");
    snapshots_.push_back({impl, storage->data(), impl->storage_offset(), static_cast<int64_t>(layouts_.size()),
                          static_cast<int32_t>(impl->dim()), impl->dtype(), impl->device()});
    layouts_.insert(layouts_.end(), impl->sizes().begin(), impl->sizes().end());
    layouts_.insert(layouts_.end(), impl->strides().begin(), impl->strides().end());
  }
}

bool TensorWatch::check_range(int64_t begin, int64_t end, bool* moved) {
  bool range_moved = false;
  for (int64_t i = begin; i < end; ++i) {
    // Thousands of TensorImpls scattered over the heap: the cache misses dominate this loop.
    if (i + 2 * kPrefetchAhead < end) {
      const char* ahead = reinterpret_cast<const char*>(snapshots_[i + 2 * kPrefetchAhead].impl);
      for (size_t line = 0; line < sizeof(c10::TensorImpl); line += 64) {
        FUSED_EMA_WATCH_PREFETCH(ahead + line);
      }
    }
    if (i + kPrefetchAhead < end) {
      FUSED_EMA_WATCH_PREFETCH(snapshots_[i + kPrefetchAhead].impl->unsafe_storage().unsafeGetStorageImpl());
    }
    Snapshot& snapshot = snapshots_[i];
    const c10::TensorImpl* impl = snapshot.impl;
    const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
    const int32_t dim = snapshot.dim;
    if (storage == nullptr || impl->dim() != dim || impl->dtype() != snapshot.dtype ||
        impl->device() != snapshot.device || impl->layout() != c10::kStrided) {
      return false;
    }
    const int64_t* sizes = impl->sizes().data();
    const int64_t* strides = impl->strides().data();
    const int64_t* layout = layouts_.data() + snapshot.layout;
    // A hand-written loop: std::equal becomes a memcmp call, which dominated this check.
    for (int32_t d = 0; d < dim; ++d) {
      if (sizes[d] != layout[d] || strides[d] != layout[dim + d]) {
        return false;
      }
    }
    // Base and offset compared apart: no multiply, and a moved view of the same storage counts.
    const void* storage_data = storage->data();
    const int64_t storage_offset = impl->storage_offset();
    if (storage_data != snapshot.storage_data || storage_offset != snapshot.storage_offset) {
      range_moved = true;
      snapshot.storage_data = storage_data;
      snapshot.storage_offset = storage_offset;
    }
  }
  *moved = *moved || range_moved;
  return true;
}

WatchState TensorWatch::refresh() {
  if (stale_) {
    return WatchState::kStale;
  }
  const int64_t count = size();
  bool moved = false;
  bool ok = true;
  if (count < kParallelMinTensors || at::in_parallel_region()) {
    ok = check_range(0, count, &moved);
  } else {
    std::atomic<bool> any_stale{false}, any_moved{false};
    at::parallel_for(0, count, kCheckGrain, [&](int64_t begin, int64_t end) {
      bool range_moved = false;
      if (!check_range(begin, end, &range_moved)) {
        any_stale.store(true, std::memory_order_relaxed);
      }
      if (range_moved) {
        any_moved.store(true, std::memory_order_relaxed);
      }
    });
    ok = !any_stale.load();
    moved = any_moved.load();
  }
  if (!ok) {
    stale_ = true;
    return WatchState::kStale;
  }
  return moved ? WatchState::kMoved : WatchState::kUnchanged;
}

void bind_tensor_watch(pybind11::module_& module) {
  namespace py = pybind11;
  py::class_<TensorWatch> watch(module, "TensorWatch", R"(A snapshot of tensors' metadata, re-checked cheaply.

TensorWatch(tensors) records each tensor's dtype, device, sizes, strides and data address.
refresh() re-reads them (metadata only: no data access, no device sync, fine for CUDA tensors) and
returns "unchanged", "moved" (only addresses changed, e.g. `param.data = t` with the
same dtype and layout; the snapshot now holds the new addresses) or "stale" (a dtype, device, shape
or stride changed; sticky: build a new watch from the tensors as they are now).)");
  watch.def(py::init<std::vector<at::Tensor>>(), py::arg("tensors"))
      .def("refresh", [](TensorWatch& self) { return state_name(self.refresh()); })
      .def_property_readonly("stale", &TensorWatch::stale)
      .def("__len__", &TensorWatch::size);
}

}  // namespace fused_ema
