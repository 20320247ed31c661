"""The functional entry points: one call updates a whole list of averages."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fused_ema.plan import Plan
from fused_ema.rounding import rounding_key


def _rounding_keys(stochastic_rounding: bool, seed: int, step: int, sets: int) -> list[int] | None:
    if not stochastic_rounding:
        return None
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return [rounding_key(seed, step, set_index) for set_index in range(sets)]


@torch.no_grad()
def lerp_(
    averages: Sequence[torch.Tensor],
    models: Sequence[torch.Tensor],
    weight: float,
    *,
    backend: str = "auto",
    stochastic_rounding: bool = False,
    seed: int = 0,
    step: int = 0,
) -> None:
    """Move every average towards its model tensor, in one fused call per device and dtype.

    ``averages[i] <- averages[i] + weight * (models[i] - averages[i])``, computed in float32
    (float64 if either side is float64) and rounded once on store. Integer and bool tensors are
    copied. With ``stochastic_rounding``, bfloat16 averages are rounded up or down at random with
    the probability that keeps them unbiased; the bits depend only on ``(seed, step)``.

    Example::

        ema = [p.detach().clone() for p in model.parameters()]
        fused_ema.lerp_(ema, list(model.parameters()), 1 - 0.999)
    """
    multi_lerp_([averages], models, [weight], backend=backend,
                stochastic_rounding=stochastic_rounding, seed=seed, step=step)


@torch.no_grad()
def multi_lerp_(
    average_sets: Sequence[Sequence[torch.Tensor]],
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    backend: str = "auto",
    stochastic_rounding: bool = False,
    seed: int = 0,
    step: int = 0,
) -> None:
    """Update several averages of the same model, reading each model tensor once.

    ``average_sets[k][i] <- lerp(average_sets[k][i], models[i], weights[k])`` for every k and i.

    Example::

        fast, slow = [clone(model) for _ in range(2)]
        fused_ema.multi_lerp_([fast, slow], list(model.parameters()), [1e-2, 1e-4])
    """
    if len(weights) != len(average_sets):
        raise ValueError(f"got {len(weights)} weights for {len(average_sets)} average sets")
    plan = Plan(average_sets, models, backend=backend)
    plan.lerp_(weights, _rounding_keys(stochastic_rounding, seed, step, len(average_sets)))
