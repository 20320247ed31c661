"""The fused_ema operators: typed wrappers of ``torch.ops.fused_ema.*`` beside their fake kernels.

Importing this module loads the C++ library: the ``fused_ema._C`` extension built at install,
after checking its build record (``_build_info.json``, written by setup.py) names this torch; an
extension built against another torch is refused, not loaded. No compiler runs unless
``FUSED_EMA_JIT=1`` is set: then a missing or refused extension is compiled once from the sources
with ``torch.utils.cpp_extension.load`` (with the CUDA kernels when torch is a CUDA build and a
matching toolkit is found), cached per torch version. When nothing loads, :data:`UNAVAILABLE_REASON`
says why and what to do, and the ``"cpu"`` backend reports it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import torch

from fused_ema import build_config

_logger = logging.getLogger("fused_ema")

_PACKAGE = Path(__file__).resolve().parent


class _CannotCompile(RuntimeError):
    """A reason the extension cannot be compiled here, already phrased for the user."""


def _source_directory() -> Path | None:
    for candidate in (_PACKAGE.parent / "csrc", _PACKAGE / "csrc"):  # source tree, installed copy
        if (candidate / "ops.cpp").is_file():
            return candidate
    return None


def _fix() -> str:
    """What to do about a missing or refused extension, for this kind of install."""
    if (_PACKAGE.parent / "setup.py").is_file():  # a source tree
        rebuild = f"`python setup.py build_ext --inplace` or `{build_config.REBUILD_COMMAND}` in {_PACKAGE.parent}"
    else:
        rebuild = f"`{build_config.REBUILD_COMMAND}` in fused_ema's source tree"
    return (f"build it against this torch with {rebuild} (needs a C++ compiler), set "
            f"{build_config.JIT_VARIABLE}=1 to compile it on first use, or use backend='foreach'")


def _refusal(record: dict | None) -> str | None:
    """Why the installed ``fused_ema._C`` must not be imported; None when it may be."""
    if record is not None and record.get("extension") is None:
        return f"the C++ extension was not built: {record.get('reason', 'installed without it')}"
    spec = importlib.util.find_spec("fused_ema._C")
    if spec is None:
        return "the C++ extension is not built (there is no fused_ema/_C)"
    if record is None:
        return (f"{spec.origin} has no build record ({build_config.RECORD_NAME}), so the torch it was built "
                "against is unknown (built by an older setup.py?)")
    if record.get("torch") != torch.__version__:
        return (f"the C++ extension was built against torch {record.get('torch')}, but this is torch "
                f"{torch.__version__}; an extension built for another torch can crash or fail with undefined symbols")
    return None


@contextlib.contextmanager
def _cuda_home(toolkit: Path | None) -> Iterator[None]:
    # torch.utils.cpp_extension fixed CUDA_HOME at its import, guessing from the nvcc on the PATH,
    # which can be a wrapper script's directory: point it at the toolkit found, for this build only.
    from torch.utils import cpp_extension

    saved = cpp_extension.CUDA_HOME
    if toolkit is not None:
        cpp_extension.CUDA_HOME = str(toolkit)
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved


def _compile() -> tuple[ModuleType, str | None]:
    """Compiles the extension from its sources (opt-in): (module, why it has no CUDA kernels or None)."""
    from torch.utils import cpp_extension

    directory = _source_directory()
    if directory is None:
        raise _CannotCompile("its sources (csrc/) are missing, so it cannot be compiled on first use")
    compiler = os.environ.get("CXX", "c++")
    if os.name != "nt" and shutil.which(compiler) is None:
        raise _CannotCompile(f"no C++ compiler ({compiler!r}) was found to compile it on first use")
    sources, toolkit, cuda_note = build_config.cpu_sources(directory), None, None
    if torch.version.cuda:
        toolkit, passed_over = build_config.find_cuda_toolkit(torch.version.cuda)
        if toolkit is None:
            major = torch.version.cuda.split(".")[0]
            cuda_note = (f"it was compiled on first use without the CUDA kernels: no CUDA {major} toolkit was "
                         f"found ({passed_over}); set CUDA_HOME to one")
        else:
            sources = sources + build_config.cuda_sources(directory)
    # One build directory per torch (and with or without CUDA): a cached build never outlives its torch.
    build_directory = Path(cpp_extension.get_default_build_root()) / (
        f"fused_ema_C-torch{torch.__version__}" + ("-cuda" if toolkit else ""))
    build_directory.mkdir(parents=True, exist_ok=True)
    _logger.warning("fused_ema: %s=1: compiling the C++ extension%s into %s (once per torch version; "
                    "a minute or more)", build_config.JIT_VARIABLE, " with its CUDA kernels" if toolkit else "",
                    build_directory)
    cflags, ldflags = build_config.compile_flags()
    with _cuda_home(toolkit):
        module = cpp_extension.load(
            name="fused_ema_C",
            sources=[str(source) for source in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=build_config.cuda_compile_flags(),
            extra_ldflags=ldflags,
            build_directory=str(build_directory),
            with_cuda=toolkit is not None,
            verbose=False,
        )
    return module, cuda_note


def _load() -> tuple[ModuleType | None, str | None, str | None]:
    """(the extension, why it did not load, why it has no CUDA kernels on a CUDA torch)."""
    record = build_config.read_record(_PACKAGE)
    reason = _refusal(record)
    if reason is None:
        try:
            from fused_ema import _C

            return _C, None, record.get("cuda_note")
        except ImportError as error:
            reason = f"the C++ extension failed to load ({error})"
    if os.environ.get(build_config.JIT_VARIABLE) != "1":
        return None, f"{reason}; {_fix()}", None
    try:
        module, cuda_note = _compile()
        return module, None, cuda_note
    except _CannotCompile as error:
        return None, f"{reason}, and {error}; {_fix()}", None
    except Exception as error:  # noqa: BLE001 - any failure means "not available", with the reason
        return None, f"{reason}, and compiling it on first use failed ({error}); {_fix()}", None


_C, UNAVAILABLE_REASON, CUDA_NOTE = _load()
"""The loaded extension module (``CpuTable`` and ``TensorWatch`` live there); when it could not
load, why not and what to do; and, for a CUDA torch, why the extension has no CUDA kernels (None
when it has them or torch is a CPU build)."""


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
