"""4000 x 256 fp32: EMA.update and AveragedModel.update_parameters against a flat lerp_ and foreach.

    python benchmarks/small_tensors_update.py [--rounds 200]

Targets (issue 13): each <= 1.5x one flat float32 lerp_ of the same bytes, and >= 10x faster than
torch._foreach_lerp_ on prebuilt lists. Medians of interleaved samples, each the mean of --calls
calls on warm caches; the machine may be shared.
"""

from __future__ import annotations

import torch
from interleaved import medians, report, small_tensors_model, small_tensors_parser

import fused_ema


def main() -> None:
    parser = small_tensors_parser(__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    model = small_tensors_model(args)
    models = [parameter.detach() for parameter in model]
    foreach_averages = [tensor.clone() for tensor in models]
    flat_model = torch.randn(args.count * args.length)
    flat_average = flat_model.clone()
    ema = fused_ema.EMA(model, decay=0.999, backend=args.backend)
    averaged = fused_ema.AveragedModel(model, multi_avg_fn=fused_ema.get_ema_multi_avg_fn(0.999),
                                       backend=args.backend)

    times = medians(
        {
            "flat lerp_": lambda: flat_average.lerp_(flat_model, 1e-3),
            "torch._foreach_lerp_": lambda: torch._foreach_lerp_(foreach_averages, models, 1e-3),
            "EMA.update": ema.update,
            "AveragedModel.update_parameters": lambda: averaged.update_parameters(model),
        },
        rounds=args.rounds,
        calls=args.calls,
    )
    report(f"{args.count} x {args.length} float32", times, [
        ("EMA / flat (<= 1.5)", "EMA.update", "flat lerp_"),
        ("AveragedModel / flat (<= 1.5)", "AveragedModel.update_parameters", "flat lerp_"),
        ("foreach / AveragedModel (>= 10)", "torch._foreach_lerp_", "AveragedModel.update_parameters"),
    ])


if __name__ == "__main__":
    main()
