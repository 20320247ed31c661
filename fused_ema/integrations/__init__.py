"""Training-framework integrations: ``fused_ema.integrations.lightning`` and ``fused_ema.integrations.transformers``.

Each submodule imports its framework when imported itself (optional extras ``lightning`` and
``transformers``); importing this package imports neither.
"""

from __future__ import annotations

import inspect
from typing import Any


def ema_keywords(**keywords: Any) -> dict[str, Any]:
    """``keywords`` for :class:`fused_ema.EMA`, checked when a callback is made rather than when fit starts."""
    from fused_ema.ema import EMA

    accepted = [name for name in inspect.signature(EMA.__init__).parameters if name not in ("self", "model")]
    for name in keywords:
        if name not in accepted:
            raise TypeError(f"unknown EMA keyword {name!r}; fused_ema.EMA takes {', '.join(accepted)}")
    return keywords
