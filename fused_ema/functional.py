"""The functional entry points: one call updates a whole list of averages."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fused_ema import backends
from fused_ema.backends import capture
from fused_ema.plan import Plan, check_weights, traced_lerp_, without_grad
from fused_ema.rounding import rounding_key


def _rounding_keys(stochastic_rounding: bool, seed: int, step: int, sets: int) -> list[int] | None:
    if not stochastic_rounding:
        return None
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return [rounding_key(seed, step, set_index) for set_index in range(sets)]


@without_grad
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
    the probability that keeps them unbiased; the bits depend only on ``(seed, step)``. Averages
    that share memory with another tensor of the call (one listed twice) are updated pair after
    pair, in list order, as a Python loop would (the GPU backends refuse them).

    Example::

        ema = [p.detach().clone() for p in model.parameters()]
        fused_ema.lerp_(ema, list(model.parameters()), 1 - 0.999)
    """
    multi_lerp_([averages], models, [weight], backend=backend,
                stochastic_rounding=stochastic_rounding, seed=seed, step=step)


@without_grad
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
    # Iterators (model.parameters()) would be used up by a path that declines: read them once.
    average_sets = [averages if isinstance(averages, (list, tuple)) else list(averages) for averages in average_sets]
    models = models if isinstance(models, (list, tuple)) else list(models)
    if len(weights) != len(average_sets):
        raise ValueError(f"got {len(weights)} weights for {len(average_sets)} average sets")
    keys = _rounding_keys(stochastic_rounding, seed, step, len(average_sets))
    if torch.compiler.is_compiling():
        traced_lerp_(average_sets, models, check_weights(weights), backend, keys)
        return
    capture.check_not_capturing()  # the fast path below must refuse a graph capture as the plan does
    name = backends.requested(backends.check_name(backend))
    weights = check_weights(weights)
    if name in ("auto", "cpu") and 1.0 not in weights:  # weight 1 is an exact copy: the plan does it
        # Lists passed per call: one C++ call reads them and builds its tables on the stack, so no
        # plan is kept (and no weak reference made) for tensors that may never come back. It
        # declines, writing nothing, whatever it does not take as it is: the plan handles that.
        lerp_lists_ = _cpu_fast_path()
        if lerp_lists_ is not None and lerp_lists_(average_sets, models, weights, keys):
            return
    Plan(average_sets, models, backend=backend).lerp_(weights, keys)


def _cpu_fast_path():
    """The C++ extension's ``lerp_lists_``, or None when the cpu backend cannot run here."""
    if backends.get("cpu").unavailable_reason() is not None:
        return None
    from fused_ema import ops

    return ops._C.lerp_lists_
