"""The version of fused_ema, in one place: pyproject.toml reads it (dynamic version) and
``fused_ema.__version__`` re-exports it. Plain text only, no imports: setuptools reads it statically."""

__version__ = "0.1.0"
