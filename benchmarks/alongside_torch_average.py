"""4000 x 256 fp32: fused_ema.AveragedModel.update_parameters interleaved with torch's AveragedModel.

    python benchmarks/alongside_torch_average.py [--rounds 200]

torch's update_parameters reassigns its n_averaged buffer (a registration) on every call. Targets
(issue 13): the fused update >= 20x faster than that torch update, and, run right after a torch
update, <= 1.2x its own undisturbed time. Medians of interleaved samples; the machine may be shared.
"""

from __future__ import annotations

from interleaved import medians, report, small_tensors_model, small_tensors_parser
from torch.optim import swa_utils

import fused_ema


def main() -> None:
    parser = small_tensors_parser(__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    model = small_tensors_model(args)
    ema = fused_ema.get_ema_multi_avg_fn(0.999)
    fused = fused_ema.AveragedModel(model, multi_avg_fn=ema, backend=args.backend)
    torch_average = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.999))

    def fused_update() -> None:
        fused.update_parameters(model)

    def torch_update() -> None:
        torch_average.update_parameters(model)

    times = medians(
        {"fused, undisturbed": fused_update, "fused, after a torch update": fused_update, "torch": torch_update},
        rounds=args.rounds,
        before={"fused, undisturbed": fused_update, "fused, after a torch update": torch_update},
    )
    report(f"{args.count} x {args.length} float32, AveragedModel.update_parameters", times, [
        ("torch / fused after a torch update (>= 20)", "torch", "fused, after a torch update"),
        ("after a torch update / undisturbed (<= 1.2)", "fused, after a torch update", "fused, undisturbed"),
    ])
    print(f"  plans built: {fused._binding.plan_builds}")


if __name__ == "__main__":
    main()
