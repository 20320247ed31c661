"""Shared test helpers: the tolerance table and the backends that run on CPU tensors here."""

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
