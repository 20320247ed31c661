"""4000 x 256 fp32: EMA.update with an unrelated nn.Linear(2, 2) created between updates.

    python benchmarks/foreign_registration.py [--rounds 200]

Creating a module registers its parameters; the plan cache must not care. Target (issue 13): <= 1.2x
the undisturbed update. Medians of interleaved samples; the machine may be shared.
"""

from __future__ import annotations

from interleaved import medians, report, small_tensors_model, small_tensors_parser
from torch import nn

import fused_ema


def main() -> None:
    parser = small_tensors_parser(__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    model = small_tensors_model(args)
    ema = fused_ema.EMA(model, decay=0.999, backend=args.backend)
    kept = []

    def create_module() -> None:
        kept[:] = [nn.Linear(2, 2)]

    times = medians(
        {"undisturbed": ema.update, "after nn.Linear(2, 2)": ema.update},
        rounds=args.rounds,
        before={"undisturbed": ema.update, "after nn.Linear(2, 2)": create_module},
    )
    report(f"{args.count} x {args.length} float32, EMA.update", times, [
        ("after nn.Linear / undisturbed (<= 1.2)", "after nn.Linear(2, 2)", "undisturbed"),
    ])
    print(f"  plans built: {ema._binding.plan_builds}")


if __name__ == "__main__":
    main()
