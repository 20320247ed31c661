// carve(): a tensor that lives inside a flat buffer but owns a storage of exactly its own bytes.
//
// The packed layout (fused_ema/modules.py pack_) keeps every averaged tensor in one contiguous
// block per device and dtype, so the kernels stream through memory. Views of that block would all
// share its storage, and torch.save of one tensor (or pickle of a module) would then write the
// whole block. A tensor made with from_blob gets its own storage, sized from its sizes and
// strides, whose deleter holds a reference to the block: the memory stays one block, and each
// tensor saves, copies and pickles as if it were allocated alone. Any device: only the address
// is used, never the data.
#include "pack.h"

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

namespace fused_ema {
namespace {

at::Tensor carve(const at::Tensor& block, int64_t byte_offset, at::IntArrayRef sizes, at::IntArrayRef strides) {
  TORCH_CHECK(block.is_contiguous() && block.storage_offset() == 0,
              "carve: the block must be a contiguous tensor at the start of its storage");
  TORCH_CHECK(sizes.size() == strides.size(), "carve: sizes and strides differ in length");
  int64_t extent = 1;  // one past the last element the tensor reaches
  for (size_t dim = 0; dim < sizes.size(); ++dim) {
    TORCH_CHECK(sizes[dim] >= 0 && strides[dim] >= 0, "carve: negative size or stride");
    if (sizes[dim] == 0) {
      extent = 0;
      break;
    }
    extent += (sizes[dim] - 1) * strides[dim];
  }
  const int64_t itemsize = static_cast<int64_t>(block.element_size());
  TORCH_CHECK(byte_offset >= 0 && byte_offset % itemsize == 0 &&
                  byte_offset + extent * itemsize <= static_cast<int64_t>(block.nbytes()),
              "carve: the tensor does not fit inside the block");
  c10::Storage keep_alive = block.storage();
  void* data = static_cast<char*>(block.data_ptr()) + byte_offset;
  return at::from_blob(
      data, sizes, strides, [keep_alive](void*) mutable { keep_alive = c10::Storage(); }, block.options(),
      block.device());
}

}  // namespace

void bind_pack(pybind11::module_& module) {
  module.def("carve", &carve, pybind11::arg("block"), pybind11::arg("byte_offset"), pybind11::arg("sizes"),
             pybind11::arg("strides"),
             "A tensor at block's byte_offset with these sizes and strides that owns a storage of exactly "
             "its bytes and keeps block's memory alive (see fused_ema.modules.pack_).");
}

}  // namespace fused_ema
