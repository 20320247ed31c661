"""4000 x 256 fp32: fused_ema.lerp_ on lists passed per call, against torch._foreach_lerp_ on them.

    python benchmarks/functional_lists.py [--rounds 200]

Targets (issue 13): on the same lists each call, <= 0.5x torch._foreach_lerp_; on new lists (fresh
tensors every call), no slower than torch._foreach_lerp_. Medians of interleaved samples; the
machine may be shared.
"""

from __future__ import annotations

import torch
from common import report, small_tensors_parser

import fused_ema
from fused_ema.bench.timer import compare


def main() -> None:
    parser = small_tensors_parser(__doc__.splitlines()[0])
    args = parser.parse_args()

    models = [torch.randn(args.length) for _ in range(args.count)]
    averages = [model.clone() for model in models]
    foreach_averages = [model.clone() for model in models]
    flat_model = torch.randn(args.count * args.length)
    flat_average = flat_model.clone()
    fresh: list[list[torch.Tensor]] = []

    def new_lists() -> None:  # untimed: new tensors, so nothing can be cached for them
        fresh[:] = [[average.clone() for average in averages], [model.clone() for model in models]]

    times = compare(
        {
            "flat lerp_": lambda: flat_average.lerp_(flat_model, 1e-3),
            "torch._foreach_lerp_": lambda: torch._foreach_lerp_(foreach_averages, models, 1e-3),
            "fused_ema.lerp_, same lists": lambda: fused_ema.lerp_(averages, models, 1e-3, backend=args.backend),
            "fused_ema.lerp_, new lists": lambda: fused_ema.lerp_(fresh[0], fresh[1], 1e-3, backend=args.backend),
            "torch._foreach_lerp_, new lists": lambda: torch._foreach_lerp_(fresh[0], fresh[1], 1e-3),
        },
        rounds=args.rounds,
        before={"fused_ema.lerp_, new lists": new_lists, "torch._foreach_lerp_, new lists": new_lists},
        label="timing",
    )
    report(f"{args.count} x {args.length} float32, lists passed per call, medians:", times, [
        ("same lists / foreach (<= 0.5)", "fused_ema.lerp_, same lists", "torch._foreach_lerp_"),
        ("new lists / foreach on new lists (<= 1)", "fused_ema.lerp_, new lists", "torch._foreach_lerp_, new lists"),
        ("same lists / flat", "fused_ema.lerp_, same lists", "flat lerp_"),
    ])


if __name__ == "__main__":
    main()
