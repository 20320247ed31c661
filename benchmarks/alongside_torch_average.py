"""4000 x 256 fp32: fused_ema.AveragedModel.update_parameters interleaved with torch's AveragedModel.

    python benchmarks/alongside_torch_average.py [--rounds 200]

torch's update_parameters reassigns its n_averaged buffer (``self.n_averaged += 1`` re-registers it)
on every call; fused_ema's plan cache must not care. Targets (issue 13): the fused update >= 20x
faster than that torch update, and, run right after a torch update, <= 1.2x its time right after the
same torch update without the re-registration (a subclass that keeps the count in place). That
comparison isolates the registration: a torch update also evicts the fused update's tensors and code
from the caches, which slows anything run after it (shown as "after a torch update / undisturbed").
Medians of interleaved samples; the machine may be shared.
"""

from __future__ import annotations

from common import report, small_tensors_model, small_tensors_parser
from torch.optim import swa_utils

import fused_ema
from fused_ema.bench.timer import compare

DECAY = 0.999
AFTER_TORCH, AFTER_SAME_WORK, UNDISTURBED = (
    "fused, after a torch update", "fused, after it minus the registration", "fused, undisturbed"
)


class InPlaceCount(swa_utils.AveragedModel):
    """torch's AveragedModel, except that ``self.n_averaged += 1`` does not re-register the buffer."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "n_averaged" and value is self._buffers.get("n_averaged"):
            return  # `+=` already added in place; torch's class would register the same tensor again
        super().__setattr__(name, value)


def main() -> None:
    args = small_tensors_parser(__doc__.splitlines()[0]).parse_args()
    model = small_tensors_model(args)
    fused = fused_ema.AveragedModel(model, multi_avg_fn=fused_ema.get_ema_multi_avg_fn(DECAY), backend=args.backend)
    torch_average = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(DECAY))
    in_place = InPlaceCount(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(DECAY))

    def fused_update() -> None:
        fused.update_parameters(model)

    def torch_update() -> None:
        torch_average.update_parameters(model)

    def same_work() -> None:
        in_place.update_parameters(model)

    times = compare(
        {UNDISTURBED: fused_update, AFTER_TORCH: fused_update, AFTER_SAME_WORK: fused_update, "torch": torch_update},
        rounds=args.rounds,
        before={UNDISTURBED: fused_update, AFTER_TORCH: torch_update, AFTER_SAME_WORK: same_work},
        label="timing",
    )
    report(f"{args.count} x {args.length} float32, AveragedModel.update_parameters, medians:", times, [
        ("torch / fused after a torch update (>= 20)", "torch", AFTER_TORCH),
        ("after a torch update / after it minus the registration (<= 1.2)", AFTER_TORCH, AFTER_SAME_WORK),
        ("after a torch update / undisturbed (caches)", AFTER_TORCH, UNDISTURBED),
    ])
    print(f"  plans built: {fused._binding.plan_builds}; torch's n_averaged: {int(torch_average.n_averaged)}, "
          f"without the registration: {int(in_place.n_averaged)}")


if __name__ == "__main__":
    main()
