#!/usr/bin/env bash
# The first run on a GPU, in one go (issue 15): build the extension for the GPU against the torch
# already installed there (never pip-installs torch), run every GPU test, run the GPU benchmark,
# and leave everything under $OUT (a temporary folder when unset).
#
#   OUT=/some/folder benchmarks/gpu_check.sh            # all stages
#   benchmarks/gpu_check.sh build test                  # some stages (each fits a 10-minute call)
#
# Stages: build (CUDAExtension for $TORCH_CUDA_ARCH_LIST, default 9.0 = H100/H200), test
# (tests/test_gpu_*.py; the host-only checks of test_cuda_compile.py and the Triton interpreter
# tests run on any CPU machine and are left out to save device time), bench (benchmarks/bench_gpu.py). Without a CUDA device, build and bench are skipped with a line in
# summary.txt and the tests run their CPU parts (their GPU parts skip): the script still exits 0,
# so a dry run on a CPU machine checks the script itself. Stage failures are recorded in
# summary.txt, never fatal: what did run still comes back.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's fused_ema, built in place, not installed
STAGES=${*:-build test bench}
SUMMARY="$OUT/summary.txt"

note() { echo "[gpu_check] $*" | tee -a "$SUMMARY"; }

"$PYTHON" - > "$OUT/machine.txt" 2>&1 <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for index in range(torch.cuda.device_count()):
    print(f"cuda:{index}", torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton: not installed", error)
EOF
cat "$OUT/machine.txt" | tee -a "$SUMMARY"
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
HAS_GPU=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

for stage in $STAGES; do
  case "$stage" in
    build)
      if [ "$HAS_GPU" != 1 ]; then note "build: skipped (no CUDA device visible to torch)"; continue; fi
      if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
      export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
      export MAX_JOBS=${MAX_JOBS:-$(nproc)}
      note "build: CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
      start=$SECONDS
      timeout 540 "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
      note "build: exit $? in $((SECONDS - start)) s (log: build.log)"
      "$PYTHON" - >> "$SUMMARY" 2>&1 <<'EOF'
import torch
from fused_ema import backends, ops
print("[gpu_check] extension:", "loaded" if ops._C is not None else f"NOT loaded ({ops.UNAVAILABLE_REASON})")
print("[gpu_check] CUDA kernel registered:",
      torch._C._dispatch_has_kernel_for_dispatch_key("fused_ema::multi_lerp_", "CUDA"))
for name, reason in backends.status().items():
    print(f"[gpu_check] backend {name}: {'available' if reason is None else reason}")
EOF
      ;;
    test)
      if ! "$PYTHON" -m pytest --version > /dev/null 2>&1; then note "test: skipped (pytest is not installed here)"; continue; fi
      start=$SECONDS
      timeout 540 "$PYTHON" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
        tests/test_gpu_*.py > "$OUT/gpu_tests.log" 2>&1
      note "test: exit $? in $((SECONDS - start)) s: $(tail -n 1 "$OUT/gpu_tests.log")"
      ;;
    bench)
      if [ "$HAS_GPU" != 1 ]; then note "bench: skipped (no CUDA device visible to torch)"; continue; fi
      start=$SECONDS
      timeout 540 "$PYTHON" benchmarks/bench_gpu.py --rounds "${BENCH_ROUNDS:-7}" --calls "${BENCH_CALLS:-10}" \
        --output "$OUT/bench_gpu.json" > "$OUT/bench_gpu.md" 2> "$OUT/bench_gpu.log"
      note "bench: exit $? in $((SECONDS - start)) s (table: bench_gpu.md)"
      ;;
    *) note "unknown stage $stage (stages: build test bench)";;
  esac
done
note "results in $OUT"
exit 0
