// The cheap per-update checks that tell whether tables built from Python objects can still run.
//
// TensorWatch: a snapshot of the metadata of a list of Python tensors (which TensorImpl each holds,
// its dtype, device, sizes, strides and data address). Shared by the CPU table (csrc/cpu/table.cpp)
// and, through pybind, by the GPU backends' device chunk table (fused_ema/backends/chunk_table.py).
// It reads TensorImpl and StorageImpl fields only, never tensor data, so it works alike for CPU and
// device tensors and never synchronises with a device.
//
// DictWatch: a snapshot of the entries of Python dicts (a module's _parameters, _buffers and
// _modules), compared by identity: it notices `module._parameters[name] = p`, `del module.weight`
// and the buffers `model.to()` replaces, which no registration hook reports.
//
// Neither holds an at::Tensor, strong or weak: torch.utils.swap_tensors (load_state_dict and
// Module.to() under torch.__future__.set_swap_module_params_on_conversion(True)) refuses a tensor
// whose TensorImpl has any other handle. They keep the Python objects instead (a Python reference
// does not count) and read the TensorImpl each object holds at every check. A TensorImpl address is
// only compared, never read after the object let go of it: should a new TensorImpl reuse the address,
// the checks of dtype, layout and data address that follow still decide whether a table may run.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

// pybind11 is built with hidden visibility; the types it binds must not be more visible than it.
#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif

namespace fused_ema {

enum class WatchState : int {
  kUnchanged = 0,  // every tensor as in the snapshot
  kMoved = 1,      // only data addresses changed (param.data = t of the same dtype and layout)
  kStale = 2,      // a dtype, device, shape or stride changed, or a Python tensor now holds another
                   // TensorImpl (torch.utils.swap_tensors): tables built from the snapshot are void
};

// The tensor a Python tensor object holds now. The caller holds the GIL or keeps the object alive.
const at::Tensor& unpack_tensor(PyObject* object);

class TensorWatch {
 public:
  TensorWatch() = default;
  // Python tensors; rejects non-tensors and tensors without storage, whose addresses cannot be watched.
  explicit TensorWatch(const pybind11::sequence& tensors);

  // Re-reads every tensor and compares it with the snapshot. kMoved also updates the snapshot's
  // data addresses, so the next call reports kUnchanged unless something moved again. kStale is
  // sticky: the owner must build a new watch (and a new table) from the tensors as they are now.
  WatchState refresh();

  bool stale() const { return stale_; }
  // The tensor that Python object `index` holds now (valid while the GIL is held).
  const at::Tensor& tensor(int64_t index) const { return unpack_tensor(objects_[index].ptr()); }
  int64_t size() const { return static_cast<int64_t>(snapshots_.size()); }

 private:
  struct Snapshot {
    PyObject* object;             // kept alive by objects_
    const c10::TensorImpl* impl;  // compared, never read: the object may hold another one now
    const void* storage_data;     // the address is storage_data + storage_offset elements
    int64_t storage_offset;
    int64_t layout;  // offset of its sizes, then strides, in layouts_
    int32_t dim;
    caffe2::TypeMeta dtype;
    c10::Device device;
  };

  // Checks snapshots [begin, end): false when one is stale; sets *moved when an address changed.
  bool check_range(int64_t begin, int64_t end, bool* moved);

  std::vector<pybind11::object> objects_;
  std::vector<Snapshot> snapshots_;
  std::vector<int64_t> layouts_;
  bool stale_ = false;
};

class DictWatch {
 public:
  // ignored: None, or one Python set (or None) per dict: keys whose values may change unnoticed.
  DictWatch(const pybind11::sequence& dicts, const pybind11::object& ignored);

  // Whether any dict gained, lost or replaced an entry (keys and values compared by identity),
  // not counting a new value of a key that is in its dict's ignored set now and was at the snapshot.
  // A dict whose version tag (PEP 509) is as recorded is not read at all: O(1) per dict.
  bool changed();
  int64_t size() const { return static_cast<int64_t>(dicts_.size()); }

 private:
  struct Snapshot {
    PyObject* dict;
    PyObject* ignored;  // a set, or nullptr
    Py_ssize_t size;
    int64_t first;     // index of its first key in items_ (key, value, key, value, ...)
    uint64_t version;  // the dict's version tag when its entries were last compared (0: none)
  };

  std::vector<pybind11::object> owned_;        // dicts and ignored sets
  std::vector<pybind11::object> owned_items_;  // items_'s objects: no address reused while watched
  std::vector<Snapshot> dicts_;
  std::vector<PyObject*> items_;
  std::vector<bool> ignored_;  // per entry: its key was ignored when the snapshot was taken
};

void bind_watches(pybind11::module_& module);

}  // namespace fused_ema

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif
