// CpuTable: the chunk table of one plan group, kept across updates so that an update costs one
// Python call with the weights, not a pass over thousands of tensor handles.
//
// Its TensorWatch (csrc/tensor_watch.h) re-reads every tensor's dtype, sizes, strides and data
// pointer at each update (a few ns per tensor): moved pointers (`param.data = t`) rebuild the table
// silently; any other change marks the table stale and it refuses to run until the owner builds a
// new one.
#include <utility>

#include <torch/csrc/utils/pybind.h>

#include "../tensor_watch.h"
#include "table.h"

namespace fused_ema::cpu {
namespace {

class CpuTable {
 public:
  CpuTable(std::vector<at::Tensor> averages, std::vector<at::Tensor> models, std::vector<int64_t> tensor_indices,
           int64_t sets)
      : averages_(std::move(averages)),
        models_(std::move(models)),
        tensor_indices_(std::move(tensor_indices)),
        sets_(sets),
        table_(averages_, models_, tensor_indices_, sets_),
        watch_(watched(models_, averages_)) {}

  // True when a tensor changed dtype, device, shape or strides: the table can no longer run.
  // Otherwise follows moved data pointers (rebuilding the table if one moved) and returns false,
  // and the next lerp_ trusts this check instead of repeating it.
  bool refresh() {
    if (broken_) {
      return true;
    }
    const WatchState state = watch_.refresh();
    if (state == WatchState::kStale) {
      return true;
    }
    if (state == WatchState::kMoved) {
      // The watch already holds the new addresses: if the rebuild throws, the old table (old
      // addresses) must never run, so the table counts as stale until a rebuild succeeds.
      broken_ = true;
      table_ = Table(averages_, models_, tensor_indices_, sets_);
      broken_ = false;
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
  static std::vector<at::Tensor> watched(const std::vector<at::Tensor>& models,
                                         const std::vector<at::Tensor>& averages) {
    std::vector<at::Tensor> tensors(models);
    tensors.insert(tensors.end(), averages.begin(), averages.end());
    return tensors;
  }

  std::vector<at::Tensor> averages_, models_;
  std::vector<int64_t> tensor_indices_;
  int64_t sets_;
  Table table_;
  TensorWatch watch_;
  bool broken_ = false;
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
