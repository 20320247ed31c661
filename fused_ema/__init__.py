"""fused_ema: weight averaging (EMA, SWA and variants) for PyTorch, fused into one call per update.

Example::

    ema = fused_ema.EMA(model, decay=0.999)
    for batch in loader:
        train_step(model, batch)
        ema.update()
    with ema.swap(model):
        evaluate(model)
"""

import warnings as _warnings

with _warnings.catch_warnings():
    # torch imported without numpy installed warns "Failed to initialize NumPy" (a class body in
    # torch/_subclasses/functional_tensor.py probes numpy). fused_ema never needs numpy, so a
    # fused-ema command, or a script whose first import is fused_ema, should not print it. Scoped:
    # the filters are restored on exit, and a torch imported earlier has already warned or not.
    _warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from fused_ema import posthoc, rules
from fused_ema.averaged_model import (
    SWALR,
    AveragedModel,
    get_ema_avg_fn,
    get_ema_multi_avg_fn,
    get_swa_avg_fn,
    get_swa_multi_avg_fn,
    update_bn,
)
from fused_ema.backends import available_backends
from fused_ema.ema import EMA
from fused_ema.functional import lerp_, multi_lerp_
from fused_ema.posthoc import PostHocEMA

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "SWALR",
    "AveragedModel",
    "PostHocEMA",
    "available_backends",
    "get_ema_avg_fn",
    "get_ema_multi_avg_fn",
    "get_swa_avg_fn",
    "get_swa_multi_avg_fn",
    "lerp_",
    "multi_lerp_",
    "posthoc",
    "rules",
    "update_bn",
]
