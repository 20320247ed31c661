"""The fused_ema operators: typed wrappers of ``torch.ops.fused_ema.*`` beside their fake kernels.

Importing this module loads the C++ library: the ``fused_ema._C`` extension built at install,
or, when the install did not build it, the same sources compiled once on first use with
``torch.utils.cpp_extension.load`` (cached under ``~/.cache/torch_extensions``). When neither
works, :data:`UNAVAILABLE_REASON` says why and what to do, and the ``"cpu"`` backend reports it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from fused_ema import build_config

_logger = logging.getLogger("fused_ema")

_FIX = ("install a C++ compiler and reinstall with `pip install --no-build-isolation .`, "
        "or use backend='foreach'")


class _CannotCompile(RuntimeError):
    """A reason the extension cannot be compiled here, already phrased for the user."""


def _source_directory() -> Path | None:
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "csrc", package / "csrc"):  # source tree, installed copy
        if (candidate / "ops.cpp").is_file():
            return candidate
    return None


def _compile() -> ModuleType:
    from torch.utils import cpp_extension

    directory = _source_directory()
    if directory is None:
        raise _CannotCompile(f"the C++ extension was not built and its sources (csrc/) are missing; {_FIX}")
    compiler = os.environ.get("CXX", "c++")
    if os.name != "nt" and shutil.which(compiler) is None:
        raise _CannotCompile(f"the C++ extension was not built and no C++ compiler ({compiler!r}) was found; {_FIX}")
    sources = build_config.cpu_sources(directory)
    _logger.warning("fused_ema: compiling the C++ extension (once, about a minute; cached afterwards)")
    cflags, ldflags = build_config.compile_flags()
    return cpp_extension.load(
        name="fused_ema_C",
        sources=[str(source) for source in sources],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        verbose=False,
    )


def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from fused_ema import _C

        return _C, None
    except ImportError as error:
        built_error = error
    if os.environ.get("FUSED_EMA_NO_JIT") == "1":
        return None, f"the C++ extension was not built ({built_error}) and FUSED_EMA_NO_JIT=1; {_FIX}"
    try:
        return _compile(), None
    except _CannotCompile as error:
        return None, str(error)
    except Exception as error:  # noqa: BLE001 - any failure means "not available", with the reason
        return None, f"compiling the C++ extension failed ({error}); {_FIX}"


_C, UNAVAILABLE_REASON = _load()
"""The loaded extension module (``CpuTable``, ``lerp_lists_``, ``TensorWatch``, ``DictWatch``) and, when it could not load, why not."""


def multi_lerp_(
    averages: Sequence[torch.Tensor],
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    tensor_indices: Sequence[int],
    rounding_keys: Sequence[int] | None = None,
) -> None:
    """``averages[k * len(models) + i] <- lerp(averages[k * len(models) + i], models[i], weights[k])``.

    ``averages`` is set-major: ``len(weights)`` sets of ``len(models)`` tensors. Computed in float32
    (float64 when either side is float64) and rounded once on store; bfloat16 averages are rounded
    stochastically with ``rounding_keys[k]`` when given (see :mod:`fused_ema.rounding`, where
    ``tensor_indices[i]`` seeds pair ``i``).

    Example::

        fused_ema.ops.multi_lerp_([fast, slow], [weight], [0.01, 0.0001], [0])
    """
    torch.ops.fused_ema.multi_lerp_(list(averages), list(models), list(weights), list(tensor_indices),
                                    None if rounding_keys is None else list(rounding_keys))


if _C is not None:

    @torch.library.register_fake("fused_ema::multi_lerp_")
    def _multi_lerp_fake(averages, models, weights, tensor_indices, rounding_keys) -> None:
        # Updates its inputs in place and returns nothing: there is no output to describe.
        return None
