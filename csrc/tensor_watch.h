// TensorWatch: a snapshot of the metadata of a list of tensors (dtype, device, sizes, strides, data
// address), and the cheap per-update check that tells whether a table of raw pointers built from
// them can still run. Shared by the CPU table (csrc/cpu/table.cpp) and, through pybind, by the GPU
// backends' device chunk table (fused_ema/backends/chunk_table.py).
//
// It reads TensorImpl and StorageImpl fields only, never tensor data, so it works alike for CPU and
// device tensors and never synchronises with a device.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace pybind11 {
class module_;
}

// pybind11 is built with hidden visibility; the types it binds must not be more visible than it.
#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif

namespace fused_ema {

enum class WatchState : int {
  kUnchanged = 0,  // every tensor as in the snapshot
  kMoved = 1,      // only data addresses changed (param.data = t of the same dtype and layout)
  kStale = 2,      // a dtype, device, shape or stride changed: tables built from the snapshot are void
};

class TensorWatch {
 public:
  TensorWatch() = default;
  // Rejects undefined tensors and tensors without storage, whose addresses cannot be watched.
  explicit TensorWatch(std::vector<at::Tensor> tensors);

  // Re-reads every tensor and compares it with the snapshot. kMoved also updates the snapshot's
  // data addresses, so the next call reports kUnchanged unless something moved again. kStale is
  // sticky: the owner must build a new watch (and a new table) from the tensors as they are now.
  WatchState refresh();

  bool stale() const { return stale_; }
  const std::vector<at::Tensor>& tensors() const { return tensors_; }
  int64_t size() const { return static_cast<int64_t>(snapshots_.size()); }

 private:
  struct Snapshot {
    const c10::TensorImpl* impl;  // kept alive by tensors_
    const void* storage_data;     // the address is storage_data + storage_offset elements
    int64_t storage_offset;
    int64_t layout;  // offset of its sizes, then strides, in layouts_
    int32_t dim;
    caffe2::TypeMeta dtype;
    c10::Device device;
  };

  // Checks snapshots [begin, end): false when one is stale; sets *moved when an address changed.
  bool check_range(int64_t begin, int64_t end, bool* moved);

  std::vector<at::Tensor> tensors_;
  std::vector<Snapshot> snapshots_;
  std::vector<int64_t> layouts_;
  bool stale_ = false;
};

void bind_tensor_watch(pybind11::module_& module);

}  // namespace fused_ema

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif
