// One launch updates every (average set, tensor) pair of a group: apex's multi_tensor_apply idea
// (a table of (tensor, chunk) rows, one thread block per chunk) without its launch-per-110-tensors
// limit, because the table lives in device memory. Each block reads its model chunk once and
// updates every average set from it (multi_lerp_chunk.cuh). Raw pointers only; the torch glue is
// multi_lerp_cuda.cpp.
#include "multi_lerp_chunk.cuh"
#include "multi_lerp_kernel.h"

namespace fused_ema {
namespace cuda {
namespace {

template <typename Average, typename Model>
__global__ void __launch_bounds__(kThreads) multi_lerp_kernel(MultiLerpArgs args) {
  __shared__ ChunkSetup<Average, Model> setup;
  setup_chunk(args, blockIdx.x, threadIdx.x, setup);
  __syncthreads();
  update_chunk(args, blockIdx.x, threadIdx.x, setup);
}

struct Launch {
  const MultiLerpArgs& args;
  cudaStream_t stream;

  template <typename Average, typename Model>
  cudaError_t operator()() const {
    // One block per chunk; gridDim.x allows 2^31 - 1 chunks (4.4e12 elements at 2048 a chunk).
    multi_lerp_kernel<Average, Model><<<static_cast<unsigned>(args.chunk_count), kThreads, 0, stream>>>(args);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t launch_multi_lerp(const MultiLerpArgs& args, cudaStream_t stream) {
  if (!valid(args)) return cudaErrorInvalidValue;
  if (args.chunk_count == 0) return cudaSuccess;
  return dispatch_types(args, Launch{args, stream});
}

}  // namespace cuda
}  // namespace fused_ema
