// The CUDA kernel's per-chunk code (csrc/cuda/multi_lerp_chunk.cuh) run on the host, block after
// block and thread after thread, as a shared library that tests/test_cuda_compile.py loads with
// ctypes and feeds CPU tensors and chunk tables built by the extension's one builder (csrc/chunk_table.cpp).
// Host code only: nvcc compiles it, no GPU runs it.
#include "multi_lerp_chunk.cuh"

namespace {

using namespace fused_ema;  // a test driver, not a header
using namespace fused_ema::cuda;

struct Emulate {
  const MultiLerpArgs& args;

  template <typename Average, typename Model>
  cudaError_t operator()() const {
    for (int64_t chunk = 0; chunk < args.chunk_count; ++chunk) {
      ChunkSetup<Average, Model> setup;
      for (int thread = 0; thread < kThreads; ++thread) setup_chunk(args, chunk, thread, setup);
      for (int thread = 0; thread < kThreads; ++thread) update_chunk(args, chunk, thread, setup);
    }
    return cudaSuccess;
  }
};

}  // namespace

extern "C" int fused_ema_emulate_multi_lerp(const void* model_base, void* average_base, const int64_t* tensors,
                                            const int64_t* chunks, const int64_t* step_args, int64_t chunk_count,
                                            int64_t chunk_elements, int sets, int average_type, int model_type,
                                            int stochastic) {
  MultiLerpArgs args;
  args.model_base = model_base;
  args.average_base = average_base;
  args.tensors = tensors;
  args.chunks = chunks;
  args.step_args = step_args;
  args.chunk_count = chunk_count;
  args.chunk_elements = chunk_elements;
  args.sets = sets;
  args.average_type = static_cast<ElementType>(average_type);
  args.model_type = static_cast<ElementType>(model_type);
  args.stochastic = stochastic != 0;
  if (!valid(args)) return 1;
  return dispatch_types(args, Emulate{args}) == cudaSuccess ? 0 : 2;
}
