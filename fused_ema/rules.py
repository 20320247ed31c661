"""Averaging rules: host-side math that turns the update count into the weight of the next update.

Every rule maps ``step`` (the number of averaging updates already applied, 0 for the first) to the
weight ``w`` of ``average <- average + w * (model - average)``, i.e. ``w = 1 - decay``. Rules hold
no tensors, so computing a weight never touches a device. A new rule is a subclass with one method::

    class Halving(Rule):
        def weight(self, step: int) -> float:
            return 0.5
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from typing import Any

import torch


def check_number(name: str, value: Any) -> float:
    """``value`` as a Python float: a float, an int, a numpy scalar or a 0-d CPU tensor (read once).

    Strings, bools, None and tensors on other devices (reading one back would synchronise) raise a
    TypeError naming ``name``. The one type check every number the
    library takes goes through (decays, rule hyperparameters, ``lerp_``'s weight).

    Example::

        check_number("decay", numpy.float32(0.999))  # 0.9990000128746033
    """
    if type(value) is float:
        number = value
    elif isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.device.type != "cpu" or value.dtype == torch.bool or value.is_complex():
            raise TypeError(
                f"{name} must be a Python float or a 0-d real CPU tensor, got a {value.dim()}-d "
                f"{str(value.dtype).replace('torch.', '')} tensor on {value.device}: reading a device "
                "tensor back would synchronise; compute it on the host (see fused_ema.rules)"
            )
        number = float(value.item())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy scalars are Reals
        number = float(value)
    else:
        raise TypeError(f"{name} must be a real number (float, int, numpy scalar or 0-d CPU tensor), got {value!r}")
    return number  # NaN passes here: every range check below rejects it, naming the range


def check_unit(name: str, value: Any) -> float:
    """``check_number`` and ``0 <= value <= 1``, else ValueError naming ``name``."""
    value = check_number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _check_positive(name: str, value: Any) -> float:
    value = check_number(name, value)
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


class Rule:
    """Base class: override :meth:`weight`. Call the rule (``rule(step)``) to get a checked weight."""

    def weight(self, step: int) -> float:
        """The weight of the update that follows ``step`` earlier updates."""
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int (the number of updates so far), got {step!r}")
        weight = float(self.weight(step))
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"{type(self).__name__}.weight({step}) returned {weight}, outside [0, 1]")
        return weight

    def weight_tensor(self, step: torch.Tensor) -> torch.Tensor:
        """:meth:`weight` computed on ``step``'s device: a float64 tensor from an integer tensor.

        Used by capturable updates (``EMA(..., capturable=True)``), whose update count lives on the
        device so that a CUDA graph replays with the right weight. Built-in rules implement it with
        the same formula as :meth:`weight`, in torch ops (no host read). Example::

            rules.SWA().weight_tensor(torch.tensor(3))  # tensor(0.2500, dtype=torch.float64)
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no device formula, which capturable=True needs: use a built-in "
            "rule, or define weight_tensor(step) with torch ops"
        )

    def get_decay(self, step: int) -> float:
        """``1 - weight``: the decay of that update, as timm's and diffusers' ``get_decay`` name it."""
        return 1.0 - self(step)

    def state_dict(self) -> dict[str, Any]:
        """The rule's hyperparameters (a rule keeps no other state: the step is the wrapper's)."""
        return {"rule": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the hyperparameters of :meth:`state_dict`; the rule is unchanged if this raises.

        When they are the constructor's arguments, a fresh rule is built from them (which
        validates them); otherwise (a rule with derived attributes, ``self.span = end - start``)
        they are set as they were saved.
        """
        state = dict(state)
        name = state.pop("rule", type(self).__name__)
        if name != type(self).__name__ and _RENAMED.get(name) != type(self).__name__:  # saved before a rename
            raise ValueError(f"this state belongs to rule {name}, not {type(self).__name__}")
        try:
            inspect.signature(type(self)).bind(**state)
        except TypeError:
            vars(self).update(state)
            return
        fresh = type(self)(**state)  # re-validates
        vars(self).update(vars(fresh))

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.state_dict().items() if k != "rule")
        return f"{type(self).__name__}({arguments})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.state_dict() == other.state_dict()


class ConstantEMA(Rule):
    """Constant decay: ``w = 1 - decay`` (ModelEmaV2 in timm, torch's ``get_ema_multi_avg_fn``).

    What ``fused_ema.EMA(model, decay=d)`` uses. Formerly ``rules.EMA`` (still accepted, deprecated:
    it shared its name with the wrapper ``fused_ema.EMA``). Example::

        ema = fused_ema.EMA(model, rule=fused_ema.rules.ConstantEMA(0.999))   # same as decay=0.999
    """

    def __init__(self, decay: float = 0.9999) -> None:
        self.decay = check_unit("decay", decay)

    def weight(self, step: int) -> float:
        return 1.0 - self.decay

    def weight_tensor(self, step: torch.Tensor) -> torch.Tensor:
        return torch.full(step.shape, 1.0 - self.decay, dtype=torch.float64, device=step.device)


class WarmupEMA(Rule):
    """EMA whose decay warms up: ``decay_t = 1 - (1 + t / inv_gamma) ** -power``, clamped to
    ``[min_decay, decay]``, and 0 (a copy) at ``t = 0``.

    From timm's ModelEmaV3, diffusers' EMAModel and ema-pytorch. ``power = 2/3`` suits short
    runs, ``3/4`` long ones (decay 0.999 at ~10K steps, 0.9999 at ~215K).
    """

    def __init__(self, decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0) -> None:
        self.decay = check_unit("decay", decay)
        self.inv_gamma = _check_positive("inv_gamma", inv_gamma)
        self.power = _check_positive("power", power)
        self.min_decay = check_unit("min_decay", min_decay)
        if self.min_decay > self.decay:
            raise ValueError(f"min_decay ({min_decay}) must not exceed decay ({decay})")

    def weight(self, step: int) -> float:
        if step == 0:
            return 1.0
        decay = 1.0 - (1.0 + step / self.inv_gamma) ** -self.power
        return 1.0 - min(max(decay, self.min_decay), self.decay)

    def weight_tensor(self, step: torch.Tensor) -> torch.Tensor:
        steps = step.to(torch.float64)
        decay = 1.0 - (1.0 + steps / self.inv_gamma) ** -self.power
        return torch.where(step == 0, 1.0, 1.0 - decay.clamp(self.min_decay, self.decay))


class RampEMA(Rule):
    """Exponential ramp: ``decay_t = decay * (1 - exp(-(t + 1) / tau))`` (YOLOv5/v8 ModelEMA, whose
    update counter already counts the update being made)."""

    def __init__(self, decay: float = 0.9999, tau: float = 2000.0) -> None:
        self.decay = check_unit("decay", decay)
        self.tau = _check_positive("tau", tau)

    def weight(self, step: int) -> float:
        return 1.0 - self.decay * (1.0 - math.exp(-(step + 1) / self.tau))

    def weight_tensor(self, step: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.decay * (1.0 - torch.exp(-(step.to(torch.float64) + 1.0) / self.tau))


class BiasCorrectedEMA(Rule):
    """Adam-style debiased EMA: after ``t`` updates the average is
    ``sum_i beta^(t-i) (1 - beta) w_i / (1 - beta^t)``, which is the lerp weight
    ``(1 - beta) / (1 - beta^(step + 1))`` (1 at the first update: no pull towards the initial copy)."""

    def __init__(self, decay: float = 0.999) -> None:
        self.decay = check_unit("decay", decay)

    def weight(self, step: int) -> float:
        if self.decay == 1.0:
            return 1.0 / (step + 1)  # the limit as decay -> 1: equal averaging
        return (1.0 - self.decay) / (1.0 - self.decay ** (step + 1))

    def weight_tensor(self, step: torch.Tensor) -> torch.Tensor:
        steps = step.to(torch.float64)
        if self.decay == 1.0:
            return 1.0 / (steps + 1.0)
        return (1.0 - self.decay) / (1.0 - torch.pow(self.decay, steps + 1.0))


class SWA(Rule):
    """Equal averaging of every model seen: ``w = 1 / (step + 1)`` (torch's default AveragedModel)."""

    def weight(self, step: int) -> float:
        return 1.0 / (step + 1)

    def weight_tensor(self, step: torch.Tensor) -> torch.Tensor:
        return 1.0 / (step.to(torch.float64) + 1.0)


class TADEMA(Rule):
    """Tanh-adaptive EMA (T_ADEMA): ``decay_t = alpha * tanh(t)``, ``t`` the updates so far.

    Starts as a copy (tanh 0 = 0) and reaches ``alpha`` within a few updates, so the average
    forgets its random start quickly and then averages like an EMA with decay ``alpha``.
    """

    def __init__(self, alpha: float = 0.999) -> None:
        self.alpha = check_unit("alpha", alpha)

    def weight(self, step: int) -> float:
        return 1.0 - self.alpha * math.tanh(step)

    def weight_tensor(self, step: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.alpha * torch.tanh(step.to(torch.float64))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the power EMA with relative standard deviation ``sigma_rel``.

    Karras et al. 2024 (EDM2), eq. 3: ``sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3)))``, i.e. the
    largest real root of ``g^3 + 7 g^2 + (16 - t) g + (12 - t)`` with ``t = sigma_rel ** -2``.
    """
    sigma_rel = _check_positive("sigma_rel", sigma_rel)
    t = sigma_rel**-2
    if t <= 12.0:  # then the largest root is <= -1: no power EMA has this width
        raise ValueError(f"sigma_rel must be < {12 ** -0.5:.4f} (gamma > -1), got {sigma_rel}")
    gamma = max(t, 1.0)  # above the largest root the cubic is convex and increasing: Newton descends
    for _ in range(200):
        value = ((gamma + 7.0) * gamma + (16.0 - t)) * gamma + (12.0 - t)
        slope = (3.0 * gamma + 14.0) * gamma + (16.0 - t)
        step = value / slope
        gamma -= step
        if abs(step) <= 1e-15 * max(1.0, abs(gamma)):
            break
    return gamma


class PowerEMA(Rule):
    """Power-function EMA of Karras et al. (EDM2): ``decay_t = (1 - 1 / (t + 1)) ** (gamma + 1)``.

    The average weighs the model at time ``tau`` in proportion to ``tau ** gamma``, so its width
    scales with training length. Give ``gamma`` or ``sigma_rel`` (EDM2 uses 0.05 to 0.10).
    """

    def __init__(self, gamma: float | None = None, sigma_rel: float | None = None) -> None:
        if (gamma is None) == (sigma_rel is None):
            raise ValueError("give exactly one of gamma or sigma_rel")
        if sigma_rel is not None:
            gamma = sigma_rel_to_gamma(sigma_rel)
        gamma = check_number("gamma", gamma)
        if not gamma > -1.0:
            raise ValueError(f"gamma must be > -1, got {gamma}")
        self.gamma = gamma
        self.sigma_rel = None if sigma_rel is None else check_number("sigma_rel", sigma_rel)

    def weight(self, step: int) -> float:
        return 1.0 - (1.0 - 1.0 / (step + 1)) ** (self.gamma + 1.0)

    def weight_tensor(self, step: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - 1.0 / (step.to(torch.float64) + 1.0)) ** (self.gamma + 1.0)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        del state["sigma_rel" if self.sigma_rel is None else "gamma"]
        return state


RULES = {rule.__name__: rule for rule in (ConstantEMA, WarmupEMA, RampEMA, BiasCorrectedEMA, SWA, TADEMA, PowerEMA)}


def from_state_dict(state: dict[str, Any]) -> Rule:
    """Rebuild a built-in rule from :meth:`Rule.state_dict`."""
    state = dict(state)
    name = state.pop("rule", None)
    name = _RENAMED.get(name, name)
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; built-in rules are {', '.join(RULES)}")
    return RULES[name](**state)


class FractionWarmupEMA(Rule):
    """torch_ema's schedule: ``decay_t = min(decay, (1 + k) / (10 + k))``, ``k = step + 1`` the number of
    updates including the current one (torch_ema's ``num_updates``), kept at or above ``min_decay``.

    Also diffusers' ``EMAModel`` without ``use_ema_warmup`` (there ``k`` starts after
    ``update_after_step + 1`` copying steps). Starts near 2/11 and reaches ``decay`` after about
    ``10 / (1 - decay)`` updates.

    Example::

        ema = fused_ema.EMA(model, rule=fused_ema.rules.FractionWarmupEMA(0.999))
        ema.update()   # decay min(0.999, 2/11) for the first update, 3/12 for the second, ...
    """

    def __init__(self, decay: float = 0.9999, *, min_decay: float = 0.0) -> None:
        self.decay = check_unit("decay", decay)
        self.min_decay = check_unit("min_decay", min_decay)
        if self.min_decay > self.decay:
            raise ValueError(f"min_decay ({min_decay}) must not exceed decay ({decay})")

    def weight(self, step: int) -> float:
        updates = step + 1
        return 1.0 - max(min(self.decay, (1.0 + updates) / (10.0 + updates)), self.min_decay)


class HalfLifeEMA(Rule):
    """Constant decay given as a half-life in updates: ``decay = 0.5 ** (1 / half_life)`` (Composer's EMA).

    After ``half_life`` updates a model's weight in the average has halved.

    Example::

        ema = fused_ema.EMA(model, rule=fused_ema.rules.HalfLifeEMA(1000))   # decay 0.999307
    """

    def __init__(self, half_life: float) -> None:
        self.half_life = _check_positive("half_life", half_life)  # in updates; also rejects nan

    @property
    def decay(self) -> float:
        return 0.5 ** (1.0 / self.half_life)

    def weight(self, step: int) -> float:
        return 1.0 - self.decay


RULES.update({rule.__name__: rule for rule in (FractionWarmupEMA, HalfLifeEMA)})

# Old rule names: still importable (with a DeprecationWarning) and still read from state dicts.
_RENAMED = {"EMA": "ConstantEMA"}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(
            f"fused_ema.rules.{name} is deprecated: it is fused_ema.rules.{new} (the same class); "
            "fused_ema.EMA is the wrapper, not a rule",
            DeprecationWarning,
            stacklevel=2,
        )
        return RULES[new]
    raise AttributeError(f"module 'fused_ema.rules' has no attribute {name!r}")
