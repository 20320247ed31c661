"""4000 x 256 fp32: fused_ema.AveragedModel.update_parameters interleaved with torch's AveragedModel.

    python benchmarks/alongside_torch_average.py [--rounds 200]

torch's update_parameters reassigns its n_averaged buffer (a registration) on every call; fused_ema's
plan cache must not care. Targets (issue 13): the fused update >= 20x faster than that torch update,
and, run right after a torch update, <= 1.2x its time right after the same memory traffic without the
registration (``torch._foreach_lerp_`` over torch's averages: what its update computes). That
comparison isolates the registration: a torch update also evicts the fused update's tensors from the
caches, which slows any update after it, the bound too (shown as "after torch / undisturbed").
Medians of interleaved samples; the machine may be shared.
"""

from __future__ import annotations

import torch
from common import report, small_tensors_model, small_tensors_parser
from torch.optim import swa_utils

import fused_ema
from fused_ema.bench.timer import compare

DECAY = 0.999
AFTER_TORCH, AFTER_MATH, UNDISTURBED = (
    "fused, after a torch update", "fused, after torch's lerp_ alone", "fused, undisturbed"
)


def main() -> None:
    args = small_tensors_parser(__doc__.splitlines()[0]).parse_args()
    model = small_tensors_model(args)
    fused = fused_ema.AveragedModel(model, multi_avg_fn=fused_ema.get_ema_multi_avg_fn(DECAY), backend=args.backend)
    torch_average = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(DECAY))
    torch_average.update_parameters(model)  # the first call copies; every later one averages
    torch_averages = list(torch_average.module.parameters())
    models = [parameter.detach() for parameter in model]

    def fused_update() -> None:
        fused.update_parameters(model)

    def torch_update() -> None:
        torch_average.update_parameters(model)

    def torch_math() -> None:
        torch._foreach_lerp_(torch_averages, models, 1 - DECAY)

    times = compare(
        {UNDISTURBED: fused_update, AFTER_TORCH: fused_update, AFTER_MATH: fused_update, "torch": torch_update},
        rounds=args.rounds,
        before={UNDISTURBED: fused_update, AFTER_TORCH: torch_update, AFTER_MATH: torch_math},
        label="timing",
    )
    report(f"{args.count} x {args.length} float32, AveragedModel.update_parameters, medians:", times, [
        ("torch / fused after a torch update (>= 20)", "torch", AFTER_TORCH),
        ("after a torch update / after its lerp_ alone (<= 1.2)", AFTER_TORCH, AFTER_MATH),
        ("after a torch update / undisturbed (caches)", AFTER_TORCH, UNDISTURBED),
    ])
    print(f"  plans built: {fused._binding.plan_builds}")


if __name__ == "__main__":
    main()
