// What the CPU backend's Python side calls: CpuTable, the chunk table of one plan group kept across
// updates (an update costs one Python call with the weights, not a pass over thousands of tensor
// handles), and lerp_lists_, the functional API's fast path (lists handed straight to C++: about 20 ns
// a tensor, where a TORCH_LIBRARY list schema costs about 125 ns).
//
// CpuTable's TensorWatch (csrc/tensor_watch.h), the one staleness check, re-reads every tensor's
// TensorImpl, dtype, sizes, strides and data pointer at each update (a few ns per tensor): moved
// pointers (`param.data = t`) rebuild the table silently; any other change marks the table stale and
// it refuses to run until the owner builds a new one. It keeps the Python tensors, not at::Tensor handles, so that
// torch.utils.swap_tensors still works on the tensors of a table.
#include <memory>
#include <utility>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include "../tensor_watch.h"
#include "table.h"

namespace fused_ema::cpu {
namespace {

namespace py = pybind11;

class CpuTable {
 public:
  CpuTable(const py::sequence& averages, const py::sequence& models, std::vector<int64_t> tensor_indices,
           int64_t sets)
      : count_(static_cast<int64_t>(py::len(models))),
        tensor_indices_(std::move(tensor_indices)),
        sets_(sets),
        watch_(concatenate(models, averages)) {
    table_ = build();
  }

  // The watch's answer (TensorWatch::refresh): kStale when a tensor changed dtype, device, shape or
  // strides, or holds another TensorImpl (the table can no longer run); kMoved when data pointers
  // moved, after rebuilding the table; kUnchanged otherwise. After either of the last two the next
  // lerp_ trusts this check instead of repeating it.
  WatchState refresh() {
    if (broken_) {
      return WatchState::kStale;
    }
    const WatchState state = watch_.refresh();
    if (state == WatchState::kStale) {
      return state;
    }
    if (state == WatchState::kMoved) {
      // The watch already holds the new addresses: if the rebuild throws, the old table (old
      // addresses) must never run, so the table counts as stale until a rebuild succeeds.
      broken_ = true;
      table_ = build();
      broken_ = false;
    }
    checked_ = true;
    return state;
  }

  // Checks the tensors (unless refresh() just did) and runs the table: one call, so the check's
  // parallel pass and the kernel's follow each other without waking the worker threads twice.
  // False, having written nothing, when the table is stale.
  bool lerp_(const std::vector<double>& weights, const std::optional<std::vector<int64_t>>& rounding_keys) {
    if (!checked_ && refresh() == WatchState::kStale) {
      return false;
    }
    checked_ = false;
    py::gil_scoped_release no_gil;  // the table holds addresses only; the plan keeps the tensors
    table_.run(weights, rounding_keys);
    return true;
  }

  int64_t numel() const { return table_.numel(); }
  int64_t sets() const { return sets_; }
  int64_t size() const { return count_; }

 private:
  static py::list concatenate(const py::sequence& models, const py::sequence& averages) {
    py::list tensors;
    for (const py::handle tensor : models) {
      tensors.append(tensor);
    }
    for (const py::handle tensor : averages) {
      tensors.append(tensor);
    }
    return tensors;
  }

  Table build() const {
    TensorRefs models, averages;
    models.reserve(count_);
    averages.reserve(watch_.size() - count_);
    for (int64_t i = 0; i < watch_.size(); ++i) {
      (i < count_ ? models : averages).push_back(&watch_.tensor(i));
    }
    return Table(averages, models, tensor_indices_, sets_);
  }

  int64_t count_;
  std::vector<int64_t> tensor_indices_;
  int64_t sets_;
  TensorWatch watch_;  // models, then the averages set-major
  Table table_;
  bool broken_ = false;
  bool checked_ = false;
};

// A tensor the fast path may hand to the kernel as is: a plain strided CPU tensor of a kernel dtype.
// Anything else (integer tensors, other devices, tensor subclasses, conjugate or negative views) is
// left to the Python path, which copies, dispatches or explains it.
bool plain_cpu_tensor(PyObject* object) {
  if (!THPVariable_Check(object)) {
    return false;
  }
  const at::Tensor& tensor = THPVariable_Unpack(object);
  if (!tensor.defined()) {
    return false;
  }
  const c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
  const at::ScalarType dtype = impl->dtype().toScalarType();
  return impl->device_type() == c10::kCPU && impl->layout() == c10::kStrided && impl->has_storage() &&
         !impl->is_python_dispatch() && !impl->is_conj() && !impl->is_neg() &&
         (dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16);
}

// Above this many elements the update releases the GIL, holding the tensors itself meanwhile.
constexpr int64_t kReleaseGilElements = int64_t{1} << 20;

// averages_sets[k][i] <- lerp(averages_sets[k][i], models[i], weights[k]); False (nothing written)
// when some tensor or pair is not one the kernel takes as it is.
bool lerp_lists(const py::handle& average_sets, const py::handle& models, const std::vector<double>& weights,
                const std::optional<std::vector<int64_t>>& rounding_keys) {
  const auto fast = [](const py::handle& sequence) {
    return py::reinterpret_steal<py::object>(PySequence_Fast(sequence.ptr(), "fused_ema: expected a sequence"));
  };
  const py::object model_items = fast(models), set_items = fast(average_sets);
  if (!model_items || !set_items) {
    PyErr_Clear();
    return false;
  }
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(model_items.ptr());
  const Py_ssize_t sets = PySequence_Fast_GET_SIZE(set_items.ptr());
  if (sets < 1 || static_cast<size_t>(sets) != weights.size()) {
    return false;
  }
  PyObject** model_objects = PySequence_Fast_ITEMS(model_items.ptr());
  TensorRefs model_refs(count), average_refs(sets * count);
  int64_t numel = 0;
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!plain_cpu_tensor(model_objects[i])) {
      return false;
    }
    model_refs[i] = &THPVariable_Unpack(model_objects[i]);
    numel += model_refs[i]->numel();
  }
  std::vector<py::object> set_lists;  // keeps each set's fast sequence alive while its items are read
  set_lists.reserve(sets);
  for (Py_ssize_t set = 0; set < sets; ++set) {
    set_lists.push_back(fast(PySequence_Fast_GET_ITEM(set_items.ptr(), set)));
    if (!set_lists.back() || PySequence_Fast_GET_SIZE(set_lists.back().ptr()) != count) {
      PyErr_Clear();
      return false;
    }
    PyObject** average_objects = PySequence_Fast_ITEMS(set_lists.back().ptr());
    for (Py_ssize_t i = 0; i < count; ++i) {
      if (!plain_cpu_tensor(average_objects[i])) {
        return false;
      }
      const at::Tensor& average = THPVariable_Unpack(average_objects[i]);
      if (average.sizes() != model_refs[i]->sizes() ||
          (set > 0 && average.scalar_type() != average_refs[i]->scalar_type())) {
        return false;
      }
      average_refs[set * count + i] = &average;
    }
  }
  std::vector<int64_t> tensor_indices(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    tensor_indices[i] = i;
  }
  if (numel < kReleaseGilElements) {
    multi_lerp_lists(average_refs, model_refs, weights, tensor_indices, rounding_keys);
    return true;
  }
  // Long enough to let other Python threads run: hold the tensors, since the lists may change.
  std::vector<at::Tensor> held;
  held.reserve(model_refs.size() + average_refs.size());
  for (const TensorRefs* tensors : {&model_refs, &average_refs}) {
    for (const at::Tensor* tensor : *tensors) {
      held.push_back(*tensor);
    }
  }
  py::gil_scoped_release no_gil;
  multi_lerp_lists(average_refs, model_refs, weights, tensor_indices, rounding_keys);
  return true;
}

}  // namespace

void bind_cpu_table(pybind11::module_& module) {
  py::class_<CpuTable>(module, "CpuTable", R"(The chunk table of one group of (average, model) pairs, kept across updates.

CpuTable(averages, models, tensor_indices, sets): averages is set-major (sets x len(models)), every
pair dense with matching strides, one dtype pair, on the CPU. lerp_(weights, rounding_keys=None)
updates averages[k][i] <- lerp(averages[k][i], models[i], weights[k]) in one parallel pass and returns
True, or False, having written nothing, when the table is stale (it checks unless refresh() just did).
refresh() returns a WatchState, as TensorWatch.refresh() does: STALE when a tensor changed dtype,
shape or strides or holds another TensorImpl (the table must be rebuilt), MOVED when storages moved
(the table followed them), UNCHANGED otherwise.)")
      // torch::wrap_pybind_function: a TORCH_WARN of the table code (pairs that share memory) reaches
      // Python as a UserWarning, as from torch's own operators, not as a line on stderr.
      .def(py::init(torch::wrap_pybind_function([](const py::sequence& averages, const py::sequence& models,
                                                    std::vector<int64_t> tensor_indices, int64_t sets) {
             return std::make_unique<CpuTable>(averages, models, std::move(tensor_indices), sets);
           })),
           py::arg("averages"), py::arg("models"), py::arg("tensor_indices"), py::arg("sets"))
      .def("refresh", torch::wrap_pybind_function(&CpuTable::refresh))
      .def("lerp_", torch::wrap_pybind_function(&CpuTable::lerp_), py::arg("weights"),
           py::arg("rounding_keys") = py::none())
      .def_property_readonly("numel", &CpuTable::numel)
      .def_property_readonly("sets", &CpuTable::sets)
      .def("__len__", &CpuTable::size);
  module.def("lerp_lists_", torch::wrap_pybind_function(&lerp_lists), py::arg("average_sets"), py::arg("models"),
             py::arg("weights"), py::arg("rounding_keys") = py::none(),
             R"(average_sets[k][i] <- lerp(average_sets[k][i], models[i], weights[k]) for CPU tensors, no plan kept.

Returns False, having written nothing, when a tensor is not a plain CPU tensor of a kernel dtype or a
pair does not match (the caller then takes the general path, which explains the problem). Stochastic
rounding of bfloat16 averages with rounding_keys[k] seeds pair i with tensor index i.)");
}

}  // namespace fused_ema::cpu
