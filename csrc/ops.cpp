// The fused_ema operator library: every schema is declared here, once. Kernels register their
// implementations per dispatch key elsewhere (csrc/cpu for CPU, csrc/cuda for CUDA), and the
// fake (meta) implementations live beside the Python wrappers in fused_ema/ops.py.
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "cpu/table.h"
#include "pack.h"
#include "tensor_watch.h"

TORCH_LIBRARY(fused_ema, m) {
  // For each set k and pair i: averages[k * len(models) + i] <- lerp(that average, models[i], weights[k]),
  // computed in float32 (float64 when either side is), rounded once on store; bfloat16 averages
  // are rounded stochastically with rounding_keys[k] when given (fused_ema/rounding.py).
  m.def("multi_lerp_(Tensor(a!)[] averages, Tensor[] models, float[] weights, int[] tensor_indices, "
        "int[]? rounding_keys) -> ()");
}

// Importing the module loads the library, which runs the registrations above; the module itself
// only carries CpuTable, the persistent table of the CPU hot path, and TensorWatch, the staleness
// check every fused backend's table shares.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  fused_ema::bind_tensor_watch(module);
  fused_ema::cpu::bind_cpu_table(module);
  fused_ema::bind_pack(module);
}
