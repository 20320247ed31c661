"""fused_ema: weight averaging (EMA, SWA and variants) for PyTorch, fused into one call per update.

Example::

    ema = fused_ema.EMA(model, decay=0.999)
    for batch in loader:
        train_step(model, batch)
        ema.update()
    with ema.swap(model):
        evaluate(model)
"""

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
