// Host build of the CUDA kernel's element arithmetic (csrc/cuda/*.h) and chunk table (csrc/chunk_table.h), driven by
// tests/test_cuda_compile.py: it reads queries on stdin and prints answers, which the test compares
// with fused_ema/rounding.py, torch's lerp and a closed form of the chunk rows.
//
//   R key tensor_index element_index float32_bits  ->  stochastic bfloat16 bits, nearest bfloat16 bits
//   L average_bits model_bits weight               ->  float32 bits of lerp(average, model, float(weight))
//   D average model weight                         ->  float64 lerp, printed with %a (exact)
//   C chunk_elements count numel...                ->  slot start pairs on one line
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <vector>

#include "chunk_table.h"
#include "lerp_math.h"

using namespace fused_ema;  // a test driver, not a header
using namespace fused_ema::cuda;

static float from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

int main() {
  char command[2];
  while (std::scanf("%1s", command) == 1) {
    if (command[0] == 'R') {
      uint32_t key, tensor_index, bits;
      uint64_t element_index;
      if (std::scanf("%" SCNu32 " %" SCNu32 " %" SCNu64 " %" SCNu32, &key, &tensor_index, &element_index, &bits) != 4) return 2;
      const uint32_t stream = rounding_stream(key, tensor_index);
      std::printf("%u %u\n", round_to_bfloat16_bits(bits, random_bits(stream, element_index)),
                  round_to_bfloat16_bits(bits, nearest_even_increment(bits)));
    } else if (command[0] == 'L') {
      uint32_t average, model;
      double weight;
      if (std::scanf("%" SCNu32 " %" SCNu32 " %lf", &average, &model, &weight) != 3) return 2;
      std::printf("%u\n", float_bits(lerp(from_bits(average), from_bits(model), static_cast<float>(weight))));
    } else if (command[0] == 'D') {
      double average, model, weight;
      if (std::scanf("%lf %lf %lf", &average, &model, &weight) != 3) return 2;
      std::printf("%a\n", lerp(average, model, weight));
    } else if (command[0] == 'C') {
      int64_t chunk_elements, count;
      if (std::scanf("%" SCNd64 " %" SCNd64, &chunk_elements, &count) != 2) return 2;
      std::vector<int64_t> numels(count);
      for (auto& numel : numels) {
        if (std::scanf("%" SCNd64, &numel) != 1) return 2;
      }
      for (int64_t value : chunk_rows(numels, chunk_elements)) std::printf("%" PRId64 " ", value);
      std::printf("\n");
    } else {
      return 3;
    }
  }
  return 0;
}
