"""CPU benchmark: every fused_ema backend and the libraries users would otherwise use, on the zoo.

Run by hand (CI's test command runs tests/ only)::

    pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-warmup=on --benchmark-columns=median,rounds
    pytest benchmarks/test_bench_cpu.py --benchmark-only --zoo-size quick --benchmark-max-time=0.05  # a smoke test

Each workload is one pytest-benchmark group, with the limit (one flat float32 lerp_ moving the same
bytes) measured in the same group; the summary printed at the end adds the ratio to that limit and
the speed-up over torch's AveragedModel. pytest-benchmark times each contender in one block, so on
a busy machine prefer ``fused-ema bench``, which interleaves the contenders.
"""

from __future__ import annotations

import pytest
import torch

from fused_ema.bench import ZOO, Skip, contenders

CONTENDERS = {contender.name: contender for contender in contenders("cpu")}


@pytest.mark.parametrize("contender_name", list(CONTENDERS))
@pytest.mark.parametrize("workload_name", list(ZOO))
def test_update(benchmark, zoo, record_result, workload_name, contender_name):
    workload, contender = zoo(workload_name), CONTENDERS[contender_name]
    try:
        update = contender.make(workload)
    except Skip as skip:
        pytest.skip(str(skip))
    with torch.no_grad():
        update()  # first calls copy (torch, ema-pytorch) or build the plan (fused_ema)
        update()
        benchmark.group = workload_name
        benchmark(update)
    record_result(workload, contender, benchmark)
