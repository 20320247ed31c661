"""Deprecated: the benchmark moved to the :mod:`fused_ema.bench` subpackage; import from there.

Every name this module had (private ones too) still resolves, from the submodule that now holds it.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from fused_ema.bench import *  # noqa: F403 - the public names, for `from fused_ema.benchmark import X`
from fused_ema.bench import __all__  # noqa: F401

warnings.warn(
    "fused_ema.benchmark is deprecated and will be removed: use fused_ema.bench (same names)",
    DeprecationWarning,
    stacklevel=2,
)

_OLD_NAMES = {"_derive": "derive", "_load_average": "load_average", "_time_calls": "time_calls",
              "_synchronizer": "synchronizer", "_quiet_timing": "quiet"}
# By full name: the package's `contenders` and `plot` attributes are the functions, not the modules.
_MODULES = [
    importlib.import_module(f"fused_ema.bench.{name}")
    for name in ("zoo", "contenders", "timer", "suite", "report", "plot")
]


def __getattr__(name: str) -> Any:
    name = _OLD_NAMES.get(name, name)
    for module in _MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'fused_ema.benchmark' has no attribute {name!r} (see fused_ema.bench)")
