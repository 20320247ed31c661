"""4000 x 256 fp32: EMA.update with an unrelated nn.Linear(2, 2) created between updates.

    python benchmarks/foreign_registration.py [--rounds 200]

Creating a module registers its parameters; the plan cache must not care. Target (issue 13): <= 1.2x
the undisturbed update. Medians of interleaved samples; the machine may be shared.
"""

from __future__ import annotations

from common import report, small_tensors_model, small_tensors_parser
from torch import nn

import fused_ema
from fused_ema.bench.timer import compare


def main() -> None:
    args = small_tensors_parser(__doc__.splitlines()[0]).parse_args()
    model = small_tensors_model(args)
    ema = fused_ema.EMA(model, decay=0.999, backend=args.backend)
    kept = []

    def create_module() -> None:
        kept[:] = [nn.Linear(2, 2)]

    times = compare(
        {"undisturbed": ema.update, "after nn.Linear(2, 2)": ema.update},
        rounds=args.rounds,
        before={"undisturbed": ema.update, "after nn.Linear(2, 2)": create_module},
        label="timing",
    )
    report(f"{args.count} x {args.length} float32, EMA.update, medians:", times, [
        ("after nn.Linear / undisturbed (<= 1.2)", "after nn.Linear(2, 2)", "undisturbed"),
    ])
    print(f"  plans built: {ema._binding.plan_builds}")


if __name__ == "__main__":
    main()
