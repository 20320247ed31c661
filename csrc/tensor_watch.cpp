// TensorWatch and DictWatch (tensor_watch.h). Reading each tensor through its Python object is what
// makes `param.data = t` (which swaps the storage inside the same TensorImpl) and `storage.resize_()`
// (which replaces the data inside the same StorageImpl) visible here as a new data address, and
// torch.utils.swap_tensors (which gives the Python object another TensorImpl) as a stale table.
#include <atomic>
#include <utility>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>

#include "tensor_watch.h"

#if defined(__GNUC__) || defined(__clang__)
#define FUSED_EMA_WATCH_PREFETCH(address) __builtin_prefetch(address)
#else
#define FUSED_EMA_WATCH_PREFETCH(address) ((void)(address))
#endif

namespace fused_ema {
namespace {

// Each tensor costs a few cache lines (its Python object, its TensorImpl, then its StorageImpl),
// a few ns a tensor on one core here; a second thread pays off from about 1000 tensors.
constexpr int64_t kParallelMinTensors = 1024;
constexpr int64_t kCheckGrain = 512;
// Three stages ahead: the Python object, then the TensorImpl it holds, then its StorageImpl.
constexpr int64_t kPrefetchAhead = 6;

// CPython (3.6 to 3.13) gives every dict a version tag (PEP 509) that changes with each change of
// its entries: an unchanged tag proves unchanged entries without reading them. 3.14 dropped the
// field, and 3.12 deprecated it, so its use is guarded at compile time and proven once at run time
// (a dict changed three ways must show three new tags); otherwise every check compares the entries.
#if PY_VERSION_HEX >= 0x03060000 && PY_VERSION_HEX < 0x030E0000
#define FUSED_EMA_DICT_VERSION 1
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
uint64_t read_version(PyObject* dict) { return reinterpret_cast<PyDictObject*>(dict)->ma_version_tag; }
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#else
uint64_t read_version(PyObject*) { return 0; }
#endif

bool version_tags_follow_changes() {
#ifdef FUSED_EMA_DICT_VERSION
  static const bool follow = [] {
    pybind11::dict probe;
    pybind11::object key = pybind11::str("key"), first = pybind11::int_(1), second = pybind11::int_(2);
    probe[key] = first;
    const uint64_t added = read_version(probe.ptr());
    probe[key] = second;
    const uint64_t replaced = read_version(probe.ptr());
    PyDict_DelItem(probe.ptr(), key.ptr());
    const uint64_t removed = read_version(probe.ptr());
    return added != 0 && replaced != added && removed != replaced && removed != added;
  }();
  return follow;
#else
  return false;
#endif
}

// 0 (never equal to a recorded tag, as no recorded tag is 0) when tags cannot be trusted.
uint64_t dict_version(PyObject* dict) { return version_tags_follow_changes() ? read_version(dict) : 0; }

}  // namespace

const at::Tensor& unpack_tensor(PyObject* object) { return THPVariable_Unpack(object); }

TensorWatch::TensorWatch(const pybind11::sequence& tensors) {
  const auto count = static_cast<size_t>(pybind11::len(tensors));
  objects_.reserve(count);
  snapshots_.reserve(count);
  for (size_t index = 0; index < count; ++index) {
    pybind11::object object = tensors[index];
    TORCH_CHECK_TYPE(THPVariable_Check(object.ptr()), "fused_ema: TensorWatch got a ",
                     Py_TYPE(object.ptr())->tp_name, " at position ", index, "; pass tensors only");
    const at::Tensor& tensor = THPVariable_Unpack(object.ptr());
    TORCH_CHECK_VALUE(tensor.defined(), "fused_ema: TensorWatch got an undefined tensor at position ", index,
                      "; pass defined tensors only");
    const c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
    const c10::StorageImpl* storage = impl->has_storage() ? impl->unsafe_storage().unsafeGetStorageImpl() : nullptr;
    TORCH_CHECK_VALUE(storage != nullptr && tensor.layout() == c10::kStrided, "fused_ema: TensorWatch got a ",
                      tensor.layout(), " tensor without storage at position ", index,
                      "; only strided tensors with storage have addresses to watch");
    snapshots_.push_back({object.ptr(), impl, storage->data(), impl->storage_offset(),
                          static_cast<int64_t>(layouts_.size()), static_cast<int32_t>(impl->dim()), impl->dtype(),
                          impl->device()});
    objects_.push_back(std::move(object));
    layouts_.insert(layouts_.end(), impl->sizes().begin(), impl->sizes().end());
    layouts_.insert(layouts_.end(), impl->strides().begin(), impl->strides().end());
  }
}

bool TensorWatch::check_range(int64_t begin, int64_t end, bool* moved) {
  bool range_moved = false;
  for (int64_t i = begin; i < end; ++i) {
    // Thousands of objects scattered over the heap: the cache misses dominate this loop.
    if (i + 3 * kPrefetchAhead < end) {
      FUSED_EMA_WATCH_PREFETCH(reinterpret_cast<const char*>(snapshots_[i + 3 * kPrefetchAhead].object) + 16);
    }
    if (i + 2 * kPrefetchAhead < end) {
      const char* ahead = reinterpret_cast<const char*>(
          unpack_tensor(snapshots_[i + 2 * kPrefetchAhead].object).unsafeGetTensorImpl());
      for (size_t line = 0; line < sizeof(c10::TensorImpl); line += 64) {
        FUSED_EMA_WATCH_PREFETCH(ahead + line);
      }
    }
    if (i + kPrefetchAhead < end) {
      FUSED_EMA_WATCH_PREFETCH(unpack_tensor(snapshots_[i + kPrefetchAhead].object)
                                   .unsafeGetTensorImpl()
                                   ->unsafe_storage()
                                   .unsafeGetStorageImpl());
    }
    Snapshot& snapshot = snapshots_[i];
    const c10::TensorImpl* impl = unpack_tensor(snapshot.object).unsafeGetTensorImpl();
    if (impl != snapshot.impl) {
      return false;
    }
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
    // The worker threads only read memory: the Python objects cannot change while this thread
    // holds the GIL.
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

DictWatch::DictWatch(const pybind11::sequence& dicts, const pybind11::object& ignored) {
  const auto count = static_cast<size_t>(pybind11::len(dicts));
  const bool has_ignored = !ignored.is_none();
  TORCH_CHECK_VALUE(!has_ignored || static_cast<size_t>(pybind11::len(ignored)) == count, "fused_ema: DictWatch got ",
                    count, " dicts but ", has_ignored ? pybind11::len(ignored) : 0,
                    " ignored-key sets; pass one (a set or None) per dict");
  dicts_.reserve(count);
  for (size_t index = 0; index < count; ++index) {
    pybind11::object dict = dicts[index];
    TORCH_CHECK_TYPE(PyDict_Check(dict.ptr()), "fused_ema: DictWatch got a ", Py_TYPE(dict.ptr())->tp_name,
                     " at position ", index, "; pass dicts only");
    pybind11::object keys = has_ignored ? pybind11::object(ignored[pybind11::int_(index)]) : pybind11::none();
    TORCH_CHECK_TYPE(keys.is_none() || PyAnySet_Check(keys.ptr()), "fused_ema: DictWatch got a ",
                     Py_TYPE(keys.ptr())->tp_name, " as ignored keys at position ", index, "; pass a set or None");
    dicts_.push_back({dict.ptr(), keys.is_none() ? nullptr : keys.ptr(), PyDict_GET_SIZE(dict.ptr()),
                      static_cast<int64_t>(items_.size()), dict_version(dict.ptr())});
    Py_ssize_t position = 0;
    PyObject *key = nullptr, *value = nullptr;
    while (PyDict_Next(dict.ptr(), &position, &key, &value)) {
      items_.push_back(key);
      items_.push_back(value);
      owned_items_.push_back(pybind11::reinterpret_borrow<pybind11::object>(key));
      owned_items_.push_back(pybind11::reinterpret_borrow<pybind11::object>(value));
      ignored_.push_back(!keys.is_none() && PySet_Contains(keys.ptr(), key) == 1);
    }
    owned_.push_back(std::move(dict));
    owned_.push_back(std::move(keys));
  }
}

bool DictWatch::changed() {
  for (Snapshot& snapshot : dicts_) {
    if (PyDict_GET_SIZE(snapshot.dict) != snapshot.size) {
      return true;
    }
    const uint64_t version = dict_version(snapshot.dict);
    if (snapshot.size == 0 || (version != 0 && version == snapshot.version)) {
      continue;
    }
    int64_t entry = snapshot.first / 2;
    Py_ssize_t position = 0;
    PyObject *key = nullptr, *value = nullptr;
    while (PyDict_Next(snapshot.dict, &position, &key, &value)) {
      PyObject** item = items_.data() + 2 * entry;
      if (key != item[0]) {
        return true;
      }
      if (value != item[1]) {
        // A value of an ignored key (ignored when the snapshot was taken and still now) may change:
        // the snapshot follows it, so the old value is not kept alive.
        if (!ignored_[entry] || PySet_Contains(snapshot.ignored, key) != 1) {
          return true;
        }
        item[1] = value;
        owned_items_[2 * entry + 1] = pybind11::reinterpret_borrow<pybind11::object>(value);
      }
      ++entry;
    }
    // The same entries under a new tag (a value set to itself, an ignored key's new value): the
    // next check trusts the new tag.
    snapshot.version = version;
  }
  return false;
}

void bind_watches(pybind11::module_& module) {
  namespace py = pybind11;
  // The one answer of every staleness check of a table (TensorWatch, CpuTable, the GPU ChunkTable).
  py::enum_<WatchState>(module, "WatchState", "What a table's refresh() found: UNCHANGED, MOVED or STALE.")
      .value("UNCHANGED", WatchState::kUnchanged, "every tensor as in the snapshot")
      .value("MOVED", WatchState::kMoved, "only data addresses changed; the snapshot holds the new ones")
      .value("STALE", WatchState::kStale, "a dtype, device, shape or stride changed, or a tensor holds "
             "another TensorImpl: tables built from the snapshot are void");
  py::class_<TensorWatch>(module, "TensorWatch", R"(A snapshot of tensors' metadata, re-checked cheaply.

TensorWatch(tensors) records which TensorImpl each Python tensor holds and its dtype, device, sizes,
strides and data address. refresh() re-reads them (metadata only: no data access, no device sync,
fine for CUDA tensors) and returns a WatchState: UNCHANGED, MOVED (only addresses changed, e.g.
`param.data = t` with the same dtype and layout; the snapshot now holds the new addresses) or
STALE (a dtype, device, shape or stride changed, or torch.utils.swap_tensors gave a tensor another
TensorImpl; sticky: build a new watch from the tensors as they are now). Holds no strong handle on
any TensorImpl, so swap_tensors works on the watched tensors.)")
      .def(py::init<const py::sequence&>(), py::arg("tensors"))
      .def("refresh", &TensorWatch::refresh)
      .def_property_readonly("stale", &TensorWatch::stale)
      .def("__len__", &TensorWatch::size);
  py::class_<DictWatch>(module, "DictWatch", R"(A snapshot of dicts' entries, compared by identity.

DictWatch(dicts, ignored=None); changed() is True once any dict gained, lost or replaced a key or
value. Given a module's _parameters, _buffers and _modules dicts, it notices every registration,
replacement and removal, including `module._parameters[name] = p`, which runs no registration hook.
ignored (one set or None per dict, read at every check): keys whose values may be replaced unnoticed
while they are in the set, as they were when the watch was made (a module's
_non_persistent_buffers_set: a rotary cache reassigned in each forward is no part of an average).)")
      .def(py::init<const py::sequence&, const py::object&>(), py::arg("dicts"), py::arg("ignored") = py::none())
      .def("changed", &DictWatch::changed)
      .def("__len__", &DictWatch::size);
}

}  // namespace fused_ema
