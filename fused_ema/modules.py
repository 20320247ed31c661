"""Deprecated: this module is now :mod:`fused_ema.binding` (it binds an averaged copy to a live model).

Every name it had (private ones too) still resolves, from :mod:`fused_ema.binding`.
"""

from __future__ import annotations

import warnings
from typing import Any

from fused_ema import binding as _binding
from fused_ema.binding import *  # noqa: F403 - the public names, for `from fused_ema.modules import X`

warnings.warn(
    "fused_ema.modules is deprecated and will be removed: use fused_ema.binding (same names)",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    try:
        return getattr(_binding, name)
    except AttributeError:
        raise AttributeError(f"module 'fused_ema.modules' has no attribute {name!r} (see fused_ema.binding)") from None
