"""Shared test helpers: the tolerance table, ulp distances, and the backends that run on CPU tensors here."""

from __future__ import annotations

import pytest
import torch

import fused_ema
from fused_ema import backends

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Closeness to a float64 closed form, by the dtype of the average (one rounding on store, plus
# float32 compute for the half types): about two units in the last place.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=3e-6, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}


def tolerance(average_dtype: torch.dtype, model_dtype: torch.dtype | None = None) -> dict:
    """Tolerance for an average of ``average_dtype``; float32 compute caps a float64 side's precision."""
    if average_dtype == torch.float64 and model_dtype not in (None, torch.float64):
        return TOLERANCES[model_dtype]
    return TOLERANCES[average_dtype]


# What each backend's results are held to on CPU tensors, in units in the last place of the
# average's dtype from backend="reference" on the same device (README, Numerics). reference is
# torch (its own lerp_ for same-dtype pairs); foreach is torch._foreach_lerp_, ATen's kernel; cpu
# follows ATen's CPU lerp step for step (same fmadd, one rounding): all bit-identical. (Triton's
# interpreter is not: tests/test_triton_backend.py states its bound.)
REFERENCE_ULPS = {"reference": 0, "foreach": 0, "cpu": 0}

_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place: how many representable values of the dtype
    lie between ``actual`` and ``expected`` (0: bit-identical, or both NaN; 1: neighbours; +0 and -0
    are 0 apart; NaN against a number is inf). Returned as float64.

    Example::

        assert ulp_distance(torch.tensor([1.0]), torch.tensor([1.0]).nextafter(torch.tensor([2.0]))).item() == 1
    """
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        raise TypeError(f"compare tensors of one dtype and shape, got {actual.dtype} {tuple(actual.shape)} "
                        f"and {expected.dtype} {tuple(expected.shape)}")
    width = torch.finfo(actual.dtype).bits

    def ordered(tensor: torch.Tensor) -> torch.Tensor:
        # Sign and magnitude to one integer line: the magnitude's bits count up from +0 and the
        # negative floats count down from -0, so neighbouring floats are neighbouring integers.
        bits = tensor.detach().cpu().contiguous().view(_BITS[tensor.dtype]).to(torch.int64)
        magnitude = bits & ((1 << (width - 1)) - 1)
        return torch.where(bits < 0, -magnitude, magnitude)

    left, right = ordered(actual), ordered(expected)
    # Exact in int64 on one side of zero; across zero the sum of two magnitudes can overflow int64
    # for float64, and is huge anyway, so add them in float64.
    distance = torch.where((left < 0) == (right < 0), (left - right).abs().double(),
                           left.double().abs() + right.double().abs())
    nan_left, nan_right = actual.detach().cpu().isnan(), expected.detach().cpu().isnan()
    distance = torch.where(nan_left & nan_right, 0.0, distance)
    return torch.where(nan_left ^ nan_right, float("inf"), distance)


def spacing(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at ``magnitude`` (float64): the gap to the next representable value above it."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(magnitude.double().abs().clamp(min=info.tiny))
    return torch.ldexp(torch.full_like(magnitude, info.eps, dtype=torch.float64), exponent - 1)


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int, what: str = "",
                       scale: torch.Tensor | float | None = None) -> None:
    """Fails, naming the worst element, unless every element is at most ``ulps`` apart (0: bit-identical).

    Apart in ulps of the result by default; with ``scale``, ``ulps`` units in the last place of
    ``actual.dtype`` at the magnitude ``scale`` also pass (a rounding of an intermediate the size of
    the operands, cancelling in the result, moves it by ulps of the operands, not of the result).
    Non-finite elements must match exactly.
    """
    distance = ulp_distance(actual, expected)
    close = distance <= ulps
    if scale is not None:
        difference = (actual.detach().cpu().double() - expected.detach().cpu().double()).abs()
        allowed = ulps * spacing(torch.as_tensor(scale, dtype=torch.float64), actual.dtype)
        close |= difference <= allowed
    if not bool(close.all()):
        worst = int(torch.where(close, -1.0, distance).argmax())
        raise AssertionError(
            f"{what}: {int((~close).sum())} of {distance.numel()} elements are more than {ulps} ulp apart"
            f"{'' if scale is None else ' (at the scale given)'}; first worst at flat index {worst}: "
            f"{actual.flatten()[worst].item()!r} against {expected.flatten()[worst].item()!r} "
            f"({distance.flatten()[worst].item():.0f} ulp of the result)"
        )


def cpu_backends() -> list[str]:
    """Every available backend that runs on CPU tensors (triton only under TRITON_INTERPRET)."""
    names = []
    for name in fused_ema.available_backends():
        device_types = backends.get(name).device_types
        if device_types is None or "cpu" in device_types:
            names.append(name)
    return names


@pytest.fixture(params=cpu_backends())
def backend(request) -> str:
    return request.param
