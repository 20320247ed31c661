"""GPU benchmark: each fused_ema GPU backend against torch._foreach_lerp_ and torch's AveragedModel.

The same model zoo as the CPU benchmark (:data:`fused_ema.bench.ZOO`), built on the GPU. Each
result reports the effective bandwidth of one update (the bytes an ideal single pass moves: read the
model once, read and write every average, divided by the time) next to the device's copy bandwidth
(``dst.copy_(src)`` of 256 MiB, read + write, measured in the same session), and the ratio of the two.

Run on a machine with an NVIDIA GPU (skipped without one)::

    pip install --no-build-isolation -e '.[test]'
    pytest benchmarks/bench_gpu.py -s --benchmark-columns=median,rounds --benchmark-sort=name

Status: written without a GPU and NOT yet run on one; no GPU figures have been measured.
"""

from __future__ import annotations

import pytest
import torch

from fused_ema import backends
from fused_ema.bench import BASELINE, ZOO, Contender, Skip, Workload, build_workload, contenders
from fused_ema.bench.timer import compare, synchronizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
GPU_BACKENDS = ("cuda", "triton", "foreach")
# Updates per timed call: one synchronize per batch, so launch latency is amortised as in training.
UPDATES_PER_ROUND = 20
COPY_BYTES = 256 << 20


def _wanted(contender: Contender) -> bool:
    return (
        contender.family == "limit"
        or contender.name.startswith(("fused_ema.EMA", "fused_ema.lerp_", "torch._foreach_lerp_"))
        or contender.name == BASELINE
    )


CONTENDERS = {c.name: c for c in contenders(DEVICE, backends=GPU_BACKENDS) if _wanted(c)}
_workloads: dict[str, Workload] = {}


def _workload(name: str) -> Workload:
    if name not in _workloads:
        _workloads.clear()  # one model on the device at a time
        torch.cuda.empty_cache()
        _workloads[name] = build_workload(name, "default", DEVICE)
    return _workloads[name]


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (read plus write), median of 20."""
    source = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    copy = compare(
        {"copy": lambda: target.copy_(source)}, rounds=20, calls=10, warmup=3, synchronize=synchronizer(DEVICE)
    )
    return 2 * COPY_BYTES / copy.median("copy")


@pytest.mark.parametrize("contender_name", list(CONTENDERS))
@pytest.mark.parametrize("workload_name", list(ZOO))
def test_update(benchmark, workload_name, contender_name, copy_bandwidth):
    contender = CONTENDERS[contender_name]
    if contender.backend in backends.NAMES and contender.backend != "auto":
        reason = backends.get(contender.backend).unavailable_reason()
        if reason is not None:
            pytest.skip(f"backend {contender.backend!r} is not available: {reason}")
    workload = _workload(workload_name)
    try:
        update = contender.make(workload)
    except Skip as reason:
        pytest.skip(str(reason))

    def rounds() -> None:
        for _ in range(UPDATES_PER_ROUND):
            update()
        torch.cuda.synchronize()

    rounds()  # warm-up: Triton compiles, tables are built, the caching allocator fills
    benchmark.pedantic(rounds, rounds=15, warmup_rounds=2)
    seconds = benchmark.stats.stats.median / UPDATES_PER_ROUND
    effective = workload.ideal_bytes / seconds
    benchmark.extra_info.update(
        workload=workload.describe(),
        gpu=torch.cuda.get_device_name(),
        seconds_per_update=seconds,
        effective_gb_per_s=effective / 1e9,
        copy_gb_per_s=copy_bandwidth / 1e9,
        fraction_of_copy_bandwidth=effective / copy_bandwidth,
    )
    print(f"\n{workload_name:>14} | {contender_name:<45} | {seconds * 1e6:10.1f} us | "
          f"{effective / 1e9:7.1f} GB/s = {effective / copy_bandwidth:6.1%} of copy ({copy_bandwidth / 1e9:.0f} GB/s)")
