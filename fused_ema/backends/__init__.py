"""Backend registry: name -> backend, why a backend cannot run, and what "auto" picks.

The contract every backend implements (:class:`Group`, :class:`Backend`, :class:`FusedBackend`,
:class:`StalePlanError`) lives in :mod:`fused_ema.backends.base`; it is re-exported here. Backend
modules import only the base, and are imported from here on first use.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Iterable

from fused_ema.backends.base import (  # noqa: F401  (the contract, re-exported)
    KERNEL_DTYPES,
    Backend,
    FusedBackend,
    Group,
    StalePlanError,
)

ENVIRONMENT_VARIABLE = "FUSED_EMA_BACKEND"

# name -> module that defines BACKEND; imported on first use (triton is slow to import).
_MODULES = {
    "reference": "fused_ema.backends.reference",
    "foreach": "fused_ema.backends.foreach",
    "cpu": "fused_ema.backends.cpu",
    "triton": "fused_ema.backends.triton",
    "cuda": "fused_ema.backends.cuda",
}
# What "auto" tries, fastest first, per device type; any other device type gets foreach.
AUTO_ORDER = {"cpu": ("cpu", "foreach"), "cuda": ("cuda", "triton", "foreach")}
NAMES = tuple(_MODULES) + ("auto",)


class _Unavailable(Backend):
    """Stands in for a backend whose module failed to import, keeping the reason."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self._reason = name, reason

    def unavailable_reason(self) -> str | None:
        return self._reason


_loaded: dict[str, Backend] = {}
_warned: set[object] = set()


def get(name: str) -> Backend:
    """The backend called ``name`` (whether or not it can run here)."""
    check_name(name)
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name]).BACKEND
        except ImportError as error:
            _loaded[name] = _Unavailable(name, f"its module failed to import ({error})")
    return _loaded[name]


def check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, NAMES))}, got {name!r}")
    return name


def requested(name: str) -> str:
    """``name``, with "auto" replaced by the ``FUSED_EMA_BACKEND`` environment variable when set.

    An invalid value of the variable raises a ValueError naming it.
    """
    check_name(name)
    if name == "auto":
        name = os.environ.get(ENVIRONMENT_VARIABLE, "auto")
        if name not in NAMES:
            raise ValueError(
                f"{ENVIRONMENT_VARIABLE}={name!r} is not a backend: backend must be one of "
                f"{', '.join(map(repr, NAMES))}; unset it to let 'auto' choose"
            )
    return name


def check_usable(name: str, device_types: Iterable[str]) -> str:
    """Raise now what the first update would raise for ``name`` on tensors of ``device_types``.

    For the wrappers' constructors: an invalid ``FUSED_EMA_BACKEND`` (ValueError), a named backend
    that cannot run on this machine, or not on these devices (RuntimeError, with the fix).
    Returns ``name`` unchanged.
    """
    chosen = requested(name)
    if chosen == "auto":
        return name
    backend = get(chosen)
    reason = backend.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend {chosen!r} is not available: {reason}")
    for device_type in sorted(set(device_types)):
        if backend.device_types is not None and device_type not in backend.device_types:
            raise RuntimeError(
                f"backend {chosen!r} cannot update these tensors: it runs on "
                f"{' or '.join(backend.device_types)} tensors, the average is on {device_type}; "
                "use backend='auto' or 'foreach'"
            )
    return name


def status() -> dict[str, str | None]:
    """Every backend name -> None if it can run on this machine, else the reason and the fix."""
    return {name: get(name).unavailable_reason() for name in _MODULES}


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, e.g. ``['reference', 'foreach', 'cpu']``."""
    return [name for name, reason in status().items() if reason is None]


def resolve(name: str, group: Group) -> Backend:
    """The backend that runs ``group`` for the requested ``name``.

    "auto" (or the ``FUSED_EMA_BACKEND`` environment variable, which overrides it) never raises:
    it picks the fastest backend that can run these tensors. A backend named explicitly that
    cannot run here raises RuntimeError; one that runs here but not on this group (strided views,
    say) hands the group to foreach, which gives the same result, and warns once.
    """
    name = requested(name)
    if name == "auto":
        order = AUTO_ORDER.get(group.device.type, ("foreach",))
        for candidate in order:
            backend = get(candidate)
            if backend.unavailable_reason() is None and backend.cannot_run(group) is None:
                if candidate != order[0] and get(order[0]).unavailable_reason() is not None:
                    _warn_once(order[0], f"backend {order[0]!r} is not available ({get(order[0]).unavailable_reason()}); "
                               f"'auto' uses {candidate!r} instead (same result, slower)")
                return backend
        return get("foreach")
    backend = get(name)
    reason = backend.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    reason = backend.cannot_run(group)
    if reason is None:
        return backend
    if group.device.type not in (backend.device_types or ()):
        raise RuntimeError(
            f"backend {name!r} cannot update these tensors: {reason}; use backend='auto' or 'foreach'"
        )
    _warn_once((name, reason), f"backend {name!r} cannot fuse some tensors ({reason}); they are updated "
               "with backend 'foreach' instead (same result, slower)")
    return get("foreach")


def _warn_once(key: object, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=5)
