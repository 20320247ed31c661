"""The backend contract: what a plan hands a backend (:class:`Group`), what a backend implements
(:class:`Backend`, :class:`FusedBackend`), and the error a backend raises on a changed tensor.

A leaf module: it imports nothing of fused_ema, so the registry (``backends/__init__.py``), the
plan (``plan.py``) and every backend module import it without a cycle. Every backend implements one
call, ``lerp_(group, weights, rounding_keys)``: for each average set ``k`` and pair ``i`` of the
group, ``averages[k][i] <- lerp(averages[k][i], models[i], weights[k])`` computed in float32
(float64 when either side is float64), rounded once on store; bfloat16 averages are rounded
stochastically when ``rounding_keys`` is given (see :mod:`fused_ema.rounding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# The dtypes every fused kernel handles, on either side of a pair and in any mix.
KERNEL_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` covers a block of memory exactly (any order of dimensions)."""
    # is_contiguous() is a C++ flag read; the general check runs in Python, so it comes last.
    return tensor.is_contiguous() or torch._prims_common.is_non_overlapping_and_dense_or_false(tensor)


class _ExtensionConstant:
    """A class attribute whose value the C++ extension defines (``fused_ema._C.<name>``), read on access.

    The value is written once, in C++ (csrc/chunk_table.h); this module must not load the extension
    at import (it imports nothing of fused_ema), so the read waits until a fused backend asks.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, instance: object, owner: type) -> int:
        from fused_ema import ops  # loaded by then: every fused backend needs the extension to run

        if ops._C is None:
            raise RuntimeError(f"fused_ema._C.{self.name} is unknown: {ops.UNAVAILABLE_REASON}")
        return getattr(ops._C, self.name)


class StalePlanError(RuntimeError):
    """Raised by a backend, before it writes anything, when a tensor changed dtype, device or layout."""


@dataclass(eq=False)
class Group:
    """Pairs that share devices and dtypes: one backend call updates all of them.

    ``averages[k][i]`` is pair ``i`` of average set ``k``; every set shares ``models``.
    ``fusable`` means every pair is dense with identical strides on one device, so a kernel may
    treat each tensor as flat memory. ``cache`` belongs to the backend (its chunk table, say).
    """

    device: torch.device
    model_device: torch.device
    average_dtype: torch.dtype
    model_dtype: torch.dtype
    averages: list[list[torch.Tensor]]
    models: list[torch.Tensor]
    tensor_indices: list[int]
    fusable: bool
    backend: Backend | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(model.numel() for model in self.models)

    def unchanged(self) -> bool:
        """Cheap check that no tensor changed dtype, device or shape since the plan was built."""
        average_dtype, model_dtype = self.average_dtype, self.model_dtype
        return all(m.dtype == model_dtype and m.device == self.model_device for m in self.models) and all(
            a.dtype == average_dtype and a.device == self.device and a.shape == m.shape
            for averages in self.averages
            for a, m in zip(averages, self.models)
        )


class Backend:
    """One way to run the update. Subclasses set ``name`` and override ``lerp_``."""

    name: str = ""
    device_types: tuple[str, ...] | None = None  # None: any device torch supports

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine at all, with the fix; None when it can."""
        return None

    def cannot_run(self, group: Group) -> str | None:
        """Why this backend cannot run ``group``; None when it can."""
        if self.device_types is not None and group.device.type not in self.device_types:
            return f"it runs on {' or '.join(self.device_types)} tensors, these are on {group.device}"
        if self.device_types is not None and not group.fusable:
            return (
                "these tensors are not dense with matching strides on one device "
                "(non-contiguous views, or an average on another device than its model)"
            )
        return None

    # Whether this backend runs a capturable update (weights in a device tensor) itself, with
    # FusedBackend.run_table_device; the others' groups go through torch._foreach_lerp_ (capture.py).
    takes_device_weights: bool = False

    def is_stale(self, group: Group) -> bool:
        """True when a tensor changed dtype, device or layout since ``group`` was built."""
        return not group.unchanged()

    def lerp_(self, group: Group, weights: Sequence[float], rounding_keys: Sequence[int] | None) -> None:
        """``averages[k][i] <- lerp(averages[k][i], models[i], weights[k])`` for every pair of ``group``."""
        raise NotImplementedError

    def checked_lerp_(self, group: Group, weights: Sequence[float], rounding_keys: Sequence[int] | None) -> None:
        """``lerp_`` after ``is_stale``: :class:`StalePlanError`, with nothing written, when a tensor changed.

        A backend may do both in one call (the cpu backend does: its check and its kernel then
        share one wake-up of the worker threads).
        """
        if self.is_stale(group):
            raise StalePlanError
        self.lerp_(group, weights, rounding_keys)


class FusedBackend(Backend):
    """A kernel that walks a chunk table built once per group: the cpu, triton and cuda backends.

    ``lerp_`` runs eagerly, over the table. Under torch.compile, where a table's pointers cannot be
    traced, the one compiled path (:func:`fused_ema.plan.traced_lerp_`) calls ``list_op`` instead: a
    ``torch.library`` operator over tensor lists, one graph node. Subclasses implement
    ``table_is_stale`` (which also follows storages swapped in place) and ``run_table``, override
    ``list_op`` when their operator is not ``fused_ema::multi_lerp_``, and, when they set
    ``takes_device_weights``, implement ``run_table_device`` for capturable updates.
    """

    # Average sets one fused pass updates (the weights of one pass sit in a fixed-size array in
    # every kernel): csrc/chunk_table.h's kMaxSets, exported as fused_ema._C.MAX_SETS.
    max_sets = _ExtensionConstant("MAX_SETS")

    def cannot_run(self, group: Group) -> str | None:
        reason = super().cannot_run(group)
        if reason is None and len(group.averages) > self.max_sets:
            reason = f"it updates at most {self.max_sets} average sets in one pass, got {len(group.averages)}"
        if reason is None and not {group.average_dtype, group.model_dtype} <= KERNEL_DTYPES:
            reason = f"it supports float32, float64, float16 and bfloat16, not {group.average_dtype} / {group.model_dtype}"
        return reason

    def is_stale(self, group: Group) -> bool:
        return self.table_is_stale(group)

    def lerp_(self, group: Group, weights: Sequence[float], rounding_keys: Sequence[int] | None) -> None:
        self.run_table(group, weights, rounding_keys)

    def table_is_stale(self, group: Group) -> bool:
        """True when ``group`` must be regrouped; rebuilds the group's table, silently, after a storage swap."""
        raise NotImplementedError

    def run_table(self, group: Group, weights: Sequence[float], rounding_keys: Sequence[int] | None) -> None:
        """:meth:`lerp_` over the group's cached table (built on first use)."""
        raise NotImplementedError

    def run_table_device(self, group: Group, weights: torch.Tensor) -> None:
        """A capturable update (:func:`fused_ema.backends.capture.lerp_`): ``weights`` is a 1-d tensor of
        one weight per average set on the group's device, read by the kernel there (no host read, no
        host-to-device copy, so a CUDA graph replays it with the current weights); no stochastic rounding.
        Called only when ``takes_device_weights`` is set and the group is fusable.
        """
        raise NotImplementedError

    def list_op(
        self,
        averages: list[torch.Tensor],
        models: list[torch.Tensor],
        weights: list[float],
        tensor_indices: list[int],
        rounding_keys: list[int] | None,
    ) -> None:
        """``averages[k * len(models) + i] <- lerp(that average, models[i], weights[k])`` as one operator."""
        torch.ops.fused_ema.multi_lerp_(averages, models, weights, tensor_indices, rounding_keys)
