"""Training-framework integrations: ``fused_ema.integrations.lightning`` and ``fused_ema.integrations.transformers``.

Each submodule imports its framework when imported itself (optional extras ``lightning`` and
``transformers``); importing this package imports neither.
"""
