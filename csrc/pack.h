// Tensors carved out of one flat buffer, each owning a storage of exactly its own bytes.
#pragma once

namespace pybind11 {
class module_;
}

namespace fused_ema {

void bind_pack(pybind11::module_& module);

}  // namespace fused_ema
