"""What the benchmark scripts share: the source tree on ``sys.path``, the many-small-tensors model and
its options, and the report of a run's target ratios. Every script times with :mod:`fused_ema.bench.timer`.

Scripts run from a checkout (``python benchmarks/<script>.py``) import the checkout's fused_ema
(built in place with ``python setup.py build_ext --inplace``), ahead of any installed copy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the source tree, ahead of any installed copy
from fused_ema.bench.timer import Comparison  # noqa: E402
from fused_ema.bench.zoo import ManySmallTensors  # noqa: E402


def small_tensors_parser(description: str) -> argparse.ArgumentParser:
    """The options every many-small-tensors script shares: ``--count`` tensors of ``--length``, ``--rounds``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--count", type=int, default=4000, help="number of tensors")
    parser.add_argument("--length", type=int, default=256, help="elements per tensor")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved samples per contender")
    parser.add_argument("--backend", default="auto")
    return parser


def small_tensors_model(args: argparse.Namespace) -> nn.ParameterList:
    """``args.count`` float32 parameters of ``args.length`` elements each (the zoo's small-tensors model)."""
    return ManySmallTensors(args.count, args.length).tensors


def report(title: str, times: Comparison, ratios: list[tuple[str, str, str]]) -> None:
    """Print ``title``, each contender's median, then each ``(label, numerator, denominator)`` ratio."""
    print(title)
    print(times.format())
    width = max(len(label) for label, _, _ in ratios)
    for label, numerator, denominator in ratios:
        print(f"  {label:<{width}}  {times.ratio(numerator, to=denominator):7.2f}x")
