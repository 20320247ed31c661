"""One timer for the small benchmark scripts: contenders interleaved, medians of per-sample means.

Each round times every contender once, in turn (A, B, C, A, B, C, ...), so a slow period of a
shared machine lands on all of them alike; each sample is the mean of ``calls`` calls after an
untimed ``before`` call (a contender's own set-up: the disturbance it is measured under, or a warm-up).
Garbage collection is off while timing.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def medians(
    contenders: dict[str, Callable[[], None]],
    rounds: int,
    calls: int = 1,
    before: dict[str, Callable[[], None]] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each contender. ``before[name]`` runs untimed before each timed call."""
    before = before or {}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            for name, update in contenders.items():  # warm-up: first calls build plans and tables
                if before.get(name) is not None:
                    before[name]()
                update()
            for _ in range(rounds):
                for name, update in contenders.items():
                    setup = before.get(name)
                    total = 0.0
                    for _ in range(calls):
                        if setup is not None:
                            setup()
                        start = time.perf_counter()
                        update()
                        total += time.perf_counter() - start
                    samples[name].append(total / calls)
    finally:
        if enabled:
            gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}


def report(title: str, times: dict[str, float], ratios: list[tuple[str, str, str]]) -> None:
    """Print each median and each ``(label, numerator, denominator)`` ratio."""
    print(title)
    for name, seconds in times.items():
        print(f"  {name:<40} {seconds * 1e3:9.3f} ms")
    for label, numerator, denominator in ratios:
        print(f"  {label:<40} {times[numerator] / times[denominator]:9.2f}x")


def small_tensors_parser(description: str) -> argparse.ArgumentParser:
    """The options every many-small-tensors script shares: ``--count`` tensors of ``--length``, ``--rounds``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=200)
    return parser


def small_tensors_model(args: argparse.Namespace) -> nn.ParameterList:
    """``args.count`` float32 parameters of ``args.length`` elements each."""
    return nn.ParameterList(nn.Parameter(torch.randn(args.length)) for _ in range(args.count))
