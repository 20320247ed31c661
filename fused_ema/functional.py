"""The functional entry points: one call updates a whole list of averages."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fused_ema import backends
from fused_ema.plan import Plan, check_pairs, check_weights, is_rounded_stochastically
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
    if torch.compiler.is_compiling():
        _traced_multi_lerp_(average_sets, models, check_weights(weights), backend,
                            _rounding_keys(stochastic_rounding, seed, step, len(average_sets)))
        return
    plan = Plan(average_sets, models, backend=backend)
    plan.lerp_(weights, _rounding_keys(stochastic_rounding, seed, step, len(average_sets)))



@torch.compiler.assume_constant_result
def _has_fused_op(device_type: str) -> bool:
    """Whether torch.ops.fused_ema.multi_lerp_ runs on this device type (loads the extension)."""
    if backends.get("cpu").unavailable_reason() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_ema::multi_lerp_", device_type.upper())


def _traced_multi_lerp_(average_sets, models, weights, backend, rounding_keys) -> None:
    """The update as torch.compile sees it: one fused operator node, no plan or table.

    The eager path's Plan keeps C++ tables and Python caches that the compiler cannot trace; here
    every fusable pair goes to ``torch.ops.fused_ema.multi_lerp_`` (which inductor runs in place),
    and the rest to the reference's torch ops, which the compiler fuses itself.
    """
    from fused_ema.backends.reference import lerp_pair_

    check_pairs(average_sets, models)
    _copy_weight_one_(average_sets, models, weights, rounding_keys, rounded=True)
    fused, per_pair = [], []
    for index, model in enumerate(models):
        averages = [average_set[index] for average_set in average_sets]
        if not (model.is_floating_point() or model.is_complex()):
            for average in averages:
                average.copy_(model)
        elif (backend not in ("reference", "foreach") and _has_fused_op(model.device.type)
              and all(a.device == model.device and a.dtype in backends.KERNEL_DTYPES for a in averages)
              and model.dtype in backends.KERNEL_DTYPES):
            fused.append(index)
        else:
            per_pair.append(index)
    if fused:
        torch.ops.fused_ema.multi_lerp_(
            [average_set[index] for average_set in average_sets for index in fused],
            [models[index] for index in fused], weights, fused, rounding_keys,
        )
    for index in per_pair:
        for set_index, weight in enumerate(weights):
            key = None if rounding_keys is None else rounding_keys[set_index]
            lerp_pair_(average_sets[set_index][index], models[index], weight, key, index)
    _copy_weight_one_(average_sets, models, weights, rounding_keys, rounded=False)


def _copy_weight_one_(average_sets, models, weights, rounding_keys, rounded: bool) -> None:
    """Weight 1 is a copy, as in Plan._run: before the update for stochastically rounded pairs, after for the rest."""
    for set_index, weight in enumerate(weights):
        if weight != 1.0:
            continue
        pairs = [(average, model) for average, model in zip(average_sets[set_index], models)
                 if is_rounded_stochastically(average.dtype, model.dtype, rounding_keys) == rounded]
        if pairs:
            torch._foreach_copy_([average for average, _ in pairs], [model for _, model in pairs])
