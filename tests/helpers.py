"""What many test files share: the dtype table, the tolerance per dtype, the backends to test here.

Import it by name (``from helpers import DTYPES, tolerance``): pytest puts tests/ on sys.path.
"""

from __future__ import annotations

import torch

import fused_ema
from fused_ema import backends

# Every floating dtype an average or a model may have; tests parametrize over it (and its pairs).
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Closeness to a float64 closed form, by the dtype of the average (one rounding on store, plus
# float32 compute for the half types): about two units in the last place.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=3e-6, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}

# The oracle every other backend is compared with.
REFERENCE = "reference"


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


def compared_backends() -> list[str]:
    """The CPU backends an agreement test compares with the reference: all of them but the reference."""
    return [name for name in cpu_backends() if name != REFERENCE]
